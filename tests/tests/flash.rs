//! `bramble flash` against copies of `tests/fixtures/rpi-os/` (a Raspberry Pi
//! OS bookworm card's boot and root partitions): the files it installs and
//! their permissions, the edits of `config.txt`, `cmdline.txt` and the account
//! files, the backups, a second run that changes nothing, an update, the dry
//! run, and the refusals (not a Pi tree, a non-aarch64 `brambled`, a model
//! that does not fit the board). The installed config and model are then
//! served by the host's `brambled`; `tests/flash-aarch64.sh` does the same
//! with the installed aarch64 binary under qemu.

use bramble_runtime::vocab::TokenizerKind;
use bramble_tests::{bramble, brambled_binary, convert_synthetic, synthetic, workspace_root};
use bramble_tools::synth::SyntheticShape;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A copy of the fixture card, a tiny model and a stand-in aarch64 `brambled`.
struct Card {
    dir: tempfile::TempDir,
}

impl Card {
    fn new() -> Card {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&workspace_root().join("tests/fixtures/rpi-os"), dir.path());
        let card = Card { dir };
        let shape = SyntheticShape { tokenizer: TokenizerKind::ByteLevelBpe, ..SyntheticShape::default() };
        convert_synthetic(&synthetic(shape, 3), &card.model(), "q8");
        std::fs::write(card.brambled(), fake_elf(183)).unwrap();
        card
    }
    fn boot(&self) -> PathBuf {
        self.dir.path().join("boot")
    }
    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
    fn model(&self) -> PathBuf {
        self.dir.path().join("tiny.bramble")
    }
    fn brambled(&self) -> PathBuf {
        self.dir.path().join("brambled-aarch64")
    }
    /// `bramble flash` onto this card with `extra` arguments.
    fn flash(&self, extra: &[&str]) -> Output {
        self.flash_onto(&self.boot(), extra)
    }
    /// `bramble flash` with `boot` as the boot partition.
    fn flash_onto(&self, boot: &Path, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "flash".into(),
            "--boot".into(),
            boot.display().to_string(),
            "--rootfs".into(),
            self.rootfs().display().to_string(),
            "--model".into(),
            self.model().display().to_string(),
            "--brambled".into(),
            self.brambled().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        bramble(&args)
    }
    fn read(&self, path: &str) -> String {
        let path = self.dir.path().join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The 64-byte header of a 64-bit little-endian ELF executable for `machine`.
fn fake_elf(machine: u16) -> Vec<u8> {
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little-endian
    header[6] = 1; // version
    header[16] = 2; // ET_EXEC
    header[18..20].copy_from_slice(&machine.to_le_bytes());
    header
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn succeeded(output: &Output) -> String {
    let (stdout, stderr) = text(output);
    assert!(output.status.success(), "bramble flash failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    stdout
}

fn failed(output: &Output) -> String {
    let (stdout, stderr) = text(output);
    assert!(!output.status.success(), "bramble flash should have failed:\n{stdout}");
    assert!(!stderr.contains("panicked"), "a panic, not an error: {stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// Every file under `dir` with its contents (symlinks as their target), sorted.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            let metadata = std::fs::symlink_metadata(&path).unwrap();
            if metadata.is_dir() {
                pending.push(path);
            } else if metadata.file_type().is_symlink() {
                files.push((path.clone(), std::fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes(), 0));
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap(), metadata.permissions().mode()));
            }
        }
    }
    files.sort();
    files
}

const FIXTURE_CMDLINE: &str = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-udevd\n";

#[test]
fn flash_installs_the_daemon_model_config_unit_user_and_uart_settings() {
    let card = Card::new();
    let original_config_txt = card.read("boot/config.txt");
    let original_group = card.read("rootfs/etc/group");
    let stdout = succeeded(&card.flash(&["--profile", "pi4-4gb"]));
    assert!(stdout.contains("memory: model needs ") && stdout.contains("<= 4.00 GiB on pi4-4gb"), "{stdout}");

    // The executable, the model, the config and the unit, with their permissions.
    let root = card.rootfs();
    let binary = root.join("usr/local/bin/brambled");
    assert_eq!(std::fs::read(&binary).unwrap(), fake_elf(183));
    assert_eq!(mode(&binary), 0o755);
    let model = root.join("var/lib/brambled/tiny.bramble");
    assert_eq!(std::fs::read(&model).unwrap(), std::fs::read(card.model()).unwrap());
    assert_eq!(mode(&model), 0o644);
    let config = card.read("rootfs/etc/brambled.toml");
    assert_eq!(mode(&root.join("etc/brambled.toml")), 0o644);
    for line in [
        "model = \"/var/lib/brambled/tiny.bramble\"",
        "threads = 4",
        "context = 2048",
        "device = \"/dev/serial0\"",
        "http = \"127.0.0.1:8080\"",
        "ndjson = \"127.0.0.1:8081\"",
    ] {
        assert!(config.contains(line), "{line:?} not in the config:\n{config}");
    }
    bramble_tools::flash::check_board_config(&config).unwrap();
    let unit = root.join("etc/systemd/system/brambled.service");
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        std::fs::read_to_string(workspace_root().join("board/brambled.service")).unwrap()
    );
    assert_eq!(mode(&unit), 0o644);
    // Enabled as `systemctl enable` does it; the serial getty and Bluetooth's UART setup masked.
    let link = |name: &str| std::fs::read_link(root.join("etc/systemd/system").join(name)).unwrap();
    assert_eq!(link("multi-user.target.wants/brambled.service"), Path::new("/etc/systemd/system/brambled.service"));
    assert_eq!(link("serial-getty@ttyAMA0.service"), Path::new("/dev/null"));
    assert_eq!(link("hciuart.service"), Path::new("/dev/null"));

    // The system user: the highest free system id (993 in this image), no login, locked, in dialout.
    let passwd = card.read("rootfs/etc/passwd");
    assert!(
        passwd.ends_with("brambled:x:993:993:Bramble LLM daemon:/var/lib/brambled:/usr/sbin/nologin\n"),
        "{passwd}"
    );
    let group = card.read("rootfs/etc/group");
    assert!(group.contains("\ndialout:x:20:pi,brambled\n") && group.ends_with("brambled:x:993:\n"), "{group}");
    assert_eq!(group.lines().count(), original_group.lines().count() + 1);
    let shadow = card.read("rootfs/etc/shadow");
    let last = shadow.lines().last().unwrap();
    assert!(last.starts_with("brambled:!:") && last.ends_with("::::::") && last.split(':').count() == 9, "{last}");
    let gshadow = card.read("rootfs/etc/gshadow");
    assert!(gshadow.contains("\ndialout:*::pi,brambled\n") && gshadow.ends_with("brambled:!::\n"), "{gshadow}");

    // The boot partition: the PL011 UART on GPIO 14/15, and no serial console on it.
    let config_txt = card.read("boot/config.txt");
    assert!(config_txt.starts_with(&original_config_txt), "existing lines untouched:\n{config_txt}");
    let added = &config_txt[original_config_txt.len()..];
    assert_eq!(
        added,
        "\n# bramble flash: the PL011 UART on GPIO 14/15 for brambled's serial console\nenable_uart=1\ndtoverlay=disable-bt\n"
    );
    assert_eq!(
        card.read("boot/cmdline.txt"),
        "console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-udevd\n"
    );

    // Every edited file's original is kept beside it.
    assert_eq!(card.read("boot/config.txt.bramble-bak"), original_config_txt);
    assert_eq!(card.read("boot/cmdline.txt.bramble-bak"), FIXTURE_CMDLINE);
    assert_eq!(card.read("rootfs/etc/group.bramble-bak"), original_group);
    for file in ["passwd", "shadow", "gshadow"] {
        let fixture =
            std::fs::read_to_string(workspace_root().join("tests/fixtures/rpi-os/rootfs/etc").join(file)).unwrap();
        assert_eq!(card.read(&format!("rootfs/etc/{file}.bramble-bak")), fixture, "{file} backup");
    }
    // No temporary file is left behind.
    let leftovers: Vec<_> = snapshot(card.dir.path())
        .into_iter()
        .filter(|(path, _, _)| path.to_string_lossy().contains(".bramble-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_second_flash_changes_nothing_and_an_update_changes_only_the_model() {
    let card = Card::new();
    succeeded(&card.flash(&[]));
    let after_first = snapshot(card.dir.path());
    let stdout = succeeded(&card.flash(&[]));
    assert!(stdout.contains("flashed: 0 steps done"), "{stdout}");
    assert_eq!(snapshot(card.dir.path()), after_first, "a second run changed the card");

    // A new model of the same name: only the model is rewritten; backups still hold the originals.
    let shape = SyntheticShape { tokenizer: TokenizerKind::ByteLevelBpe, dim: 96, ..SyntheticShape::default() };
    convert_synthetic(&synthetic(shape, 4), &card.model(), "q8");
    let stdout = succeeded(&card.flash(&[]));
    assert!(stdout.contains("flashed: 1 steps done"), "{stdout}");
    assert_eq!(
        std::fs::read(card.rootfs().join("var/lib/brambled/tiny.bramble")).unwrap(),
        std::fs::read(card.model()).unwrap()
    );
    assert_eq!(card.read("boot/cmdline.txt.bramble-bak"), FIXTURE_CMDLINE);
    assert_eq!(card.read("rootfs/etc/passwd").lines().filter(|l| l.starts_with("brambled:")).count(), 1);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let card = Card::new();
    let before = snapshot(card.dir.path());
    let stdout = succeeded(&card.flash(&["--dry-run", "--profile", "pi5"]));
    assert_eq!(snapshot(card.dir.path()), before, "the dry run wrote something");
    for expected in [
        "plan (dry run: nothing is written)",
        "usr/local/bin/brambled (0755)",
        "var/lib/brambled/tiny.bramble (0644)",
        "etc/brambled.toml (0644, brambled's config for pi5)",
        "multi-user.target.wants/brambled.service -> /etc/systemd/system/brambled.service",
        "config.txt (dtparam=uart0=on under [all]; original kept as",
        "cmdline.txt (no serial console",
        "kernels neon+dotprod",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in the plan:\n{stdout}");
    }
    // Only /usr/local/bin, which Raspberry Pi OS has, is already in place.
    assert!(stdout.contains("dry run: 14 steps to do, 1 already in place"), "{stdout}");
}

#[test]
fn trees_that_are_not_a_pi_card_are_refused_naming_what_is_missing() {
    let card = Card::new();
    let before = snapshot(card.dir.path());
    // The root partition given as the boot partition.
    let stderr = failed(&card.flash_onto(&card.rootfs(), &[]));
    assert!(
        stderr.contains("is not a Raspberry Pi OS boot partition: missing config.txt, cmdline.txt, firmware"),
        "{stderr}"
    );

    std::fs::remove_file(card.rootfs().join("etc/os-release")).unwrap();
    std::fs::remove_dir_all(card.rootfs().join("usr/lib/aarch64-linux-gnu")).unwrap();
    let stderr = failed(&card.flash(&[]));
    assert!(
        stderr.contains(
            "is not a 64-bit Raspberry Pi OS root partition: missing etc/os-release, usr/lib/aarch64-linux-gnu"
        ),
        "{stderr}"
    );
    let after: Vec<_> = snapshot(card.dir.path());
    assert!(after.iter().all(|entry| before.contains(entry)), "a refused flash wrote something");
}

#[test]
fn a_brambled_that_is_not_aarch64_is_refused() {
    let card = Card::new();
    std::fs::write(card.brambled(), fake_elf(62)).unwrap();
    let stderr = failed(&card.flash(&[]));
    assert!(
        stderr.contains("is a 64-bit x86-64 executable; the pi4 profile (cortex-a72) runs 64-bit aarch64 ones"),
        "{stderr}"
    );
    assert!(stderr.contains("--target aarch64-unknown-linux-gnu"), "{stderr}");
    std::fs::write(card.brambled(), b"#!/bin/sh\necho hi\n").unwrap();
    assert!(failed(&card.flash(&[])).contains("not an ELF executable"));
    assert!(!card.rootfs().join("usr/local/bin/brambled").exists());
}

#[test]
fn a_model_that_does_not_fit_the_zero_2w_is_refused_with_the_arithmetic() {
    let card = Card::new();
    // 2 layers × 2 × 1 Mi positions × 64 (4 KV heads of 16) × 4 bytes: 1 GiB of KV cache.
    let shape = SyntheticShape {
        n_kv_heads: 4,
        context_length: 1 << 20,
        tokenizer: TokenizerKind::ByteLevelBpe,
        ..SyntheticShape::default()
    };
    convert_synthetic(&synthetic(shape, 5), &card.model(), "q8");
    let stderr = failed(&card.flash(&["--profile", "pi-zero-2w", "--context", "1048576"]));
    assert!(stderr.contains("does not fit the Raspberry Pi Zero 2 W"), "{stderr}");
    assert!(stderr.contains("GiB weights + 1.00 GiB KV cache (ctx 1048576) + "), "{stderr}");
    assert!(stderr.contains("GiB OS headroom = ") && stderr.contains("> 0.50 GiB on pi-zero-2w"), "{stderr}");
    assert!(!card.rootfs().join("usr/local/bin/brambled").exists());
    // The same model with a short context fits.
    succeeded(&card.flash(&["--profile", "pi-zero-2w", "--context", "2048", "--dry-run"]));
    // This model's heads (16 channels) cannot take a quantized cache: named before anything is written.
    let stderr = failed(&card.flash(&["--profile", "pi-zero-2w", "--kv", "q4"]));
    assert!(stderr.contains("--kv q4") && stderr.contains("head_dim"), "{stderr}");
    // An unknown profile is named.
    let stderr = failed(&card.flash(&["--profile", "pi3"]));
    assert!(stderr.contains("unknown board profile \"pi3\""), "{stderr}");
}

#[test]
fn a_quantized_kv_cache_makes_a_long_context_fit_and_is_written_into_the_config() {
    let card = Card::new();
    // Heads of 32 channels; at 512 Ki positions an f32 cache is 0.5 GiB, a q4 one about 0.15.
    let shape = SyntheticShape {
        n_heads: 2,
        n_kv_heads: 2,
        context_length: 1 << 19,
        tokenizer: TokenizerKind::ByteLevelBpe,
        ..SyntheticShape::default()
    };
    convert_synthetic(&synthetic(shape, 5), &card.model(), "q8");
    let zero = ["--profile", "pi-zero-2w", "--context", "524288"];
    let stderr = failed(&card.flash(&zero));
    assert!(stderr.contains("0.50 GiB KV cache (ctx 524288)") && stderr.contains("--kv q4"), "{stderr}");
    let output = succeeded(&card.flash(&[&zero[..], &["--kv", "q4"]].concat()));
    assert!(output.contains("GiB KV cache (ctx 524288, kv q4)") && output.contains("<= 0.50 GiB"), "{output}");
    let config = card.read("rootfs/etc/brambled.toml");
    assert!(config.contains("kv = \"q4\"") && config.contains("context = 524288"), "{config}");
    bramble_tools::flash::check_board_config(&config).unwrap();
    // A mode that is not one is refused by the flag's parser.
    assert!(failed(&card.flash(&["--kv", "q3"])).contains("q3"));
}

/// The card's own config and model, served by the host's `brambled` (the
/// aarch64 one under qemu: `tests/flash-aarch64.sh`): the config parses, the
/// model loads from where it was installed, and `/health` answers over TCP.
#[test]
fn the_host_brambled_serves_the_installed_config_and_model() {
    let card = Card::new();
    succeeded(&card.flash(&[]));
    let root = card.rootfs();
    // The board paths in the config point into the card; the flags redirect what the host cannot open.
    let mut child = Command::new(brambled_binary())
        .arg("--config")
        .arg(root.join("etc/brambled.toml"))
        .arg("--model")
        .arg(root.join("var/lib/brambled/tiny.bramble"))
        .args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn brambled");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let started = Instant::now();
    let mut log = String::new();
    let mut http = None;
    let mut line = String::new();
    while started.elapsed() < Duration::from_secs(60) {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some((_, address)) = line.split_once("http listening on ") {
            http = Some(address.trim().to_string());
        }
        if line.contains("brambled: info: ready") {
            break;
        }
    }
    let result = std::panic::catch_unwind(|| {
        assert!(
            log.contains("4 threads, context 128"),
            "the config's threads and context (capped at the model's):\n{log}"
        );
        let address = http.clone().unwrap_or_else(|| panic!("no HTTP listener:\n{log}"));
        let mut stream = TcpStream::connect(&address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // Host names the loopback address connected to: brambled on loopback serves no other name.
        write!(stream, "GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"status\":\"ok\"") && response.contains("\"model\":\"tiny\""), "{response}");
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A stand-in `ssh` and `scp` over a directory that plays the board: ssh logs
/// its command line, answers the probe (`$FAKE_MACHINE`, 3884000 kB, /home/pi,
/// /boot/firmware), `cat` of the boot files from the fixture, keeps what
/// `sudo sh -s` reads, and fails the first `curl` of /health (the daemon is
/// still starting) then answers it; scp copies what it is given into `uploaded/`.
struct FakeBoard {
    card: Card,
    dir: PathBuf,
}

const FAKE_SSH: &str = r#"#!/bin/sh
printf 'ssh %s\n' "$*" >> "$FAKE_BOARD/log"
for remote; do :; done
case "$remote" in
    "uname -m"*) printf '%s\n' "${FAKE_MACHINE:-aarch64}" "3884000 kB" /home/pi /boot/firmware ;;
    "cat /boot/firmware/config.txt") cat "$FAKE_BOARD/card/boot/config.txt" ;;
    "cat /boot/firmware/cmdline.txt") cat "$FAKE_BOARD/card/boot/cmdline.txt" ;;
    "mkdir -p /home/pi/.bramble-deploy") ;;
    "sudo sh -s") cat > "$FAKE_BOARD/script.sh" ;;
    curl*)
        n=$(cat "$FAKE_BOARD/curls" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$FAKE_BOARD/curls"
        if [ $n -lt 2 ]; then echo "curl: (7) Failed to connect to 127.0.0.1 port 8080" >&2; exit 7; fi
        echo '{"status":"ok","model":"tiny","served":0}' ;;
    *) echo "fake ssh: unexpected command: $remote" >&2; exit 1 ;;
esac
"#;

const FAKE_SCP: &str = r#"#!/bin/sh
printf 'scp %s\n' "$*" >> "$FAKE_BOARD/log"
mkdir -p "$FAKE_BOARD/uploaded"
count=$#; index=0; skip=no
for argument; do
    index=$((index + 1))
    [ $index -lt $count ] || break
    if [ $skip = yes ]; then skip=no; continue; fi
    case "$argument" in -o) skip=yes; continue ;; -*) continue ;; esac
    cp -L "$argument" "$FAKE_BOARD/uploaded/" || exit 1
done
"#;

impl FakeBoard {
    fn new() -> FakeBoard {
        let card = Card::new();
        let dir = card.dir.path().to_path_buf();
        // The Card's trees double as the board's boot partition for `cat`.
        std::fs::create_dir_all(dir.join("card")).unwrap();
        copy_tree(&card.boot(), &dir.join("card/boot"));
        for (name, text) in [("ssh", FAKE_SSH), ("scp", FAKE_SCP)] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        FakeBoard { card, dir }
    }

    fn deploy(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        self.deploy_with(&self.dir.join("ssh"), &self.dir.join("scp"), extra, env)
    }

    fn deploy_with(&self, ssh: &Path, scp: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(bramble_tests::bramble_binary());
        command
            .args(["deploy", "--host", "pi@raspberrypi.local", "--health-timeout", "30"])
            .arg("--model")
            .arg(self.card.model())
            .arg("--brambled")
            .arg(self.card.brambled())
            .arg("--ssh")
            .arg(ssh)
            .arg("--scp")
            .arg(scp)
            .args(extra)
            .env("FAKE_BOARD", &self.dir)
            .stdin(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().expect("run bramble deploy")
    }

    fn read(&self, path: &str) -> String {
        let path = self.dir.join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

#[test]
fn deploy_probes_uploads_installs_restarts_and_waits_for_health() {
    let board = FakeBoard::new();
    let output = board.deploy(&[], &[]);
    let stdout = succeeded(&output);
    // MemTotal 3884000 kB: the 4 GB Pi 4.
    assert!(stdout.contains("board: pi4-4gb"), "{stdout}");
    assert!(stdout.contains("pi@raspberrypi.local: brambled is healthy: {\"status\":\"ok\""), "{stdout}");
    assert!(stdout.contains("config.txt and cmdline.txt changed") && stdout.contains("sudo reboot"), "{stdout}");

    // The commands, in order.
    let log = board.read("log");
    let commands: Vec<&str> = log.lines().map(|l| l.split_once(' ').unwrap().0).collect();
    assert_eq!(commands, ["ssh", "ssh", "ssh", "ssh", "scp", "ssh", "ssh", "ssh"], "{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].ends_with("pi@raspberrypi.local uname -m; sed -n 's/^MemTotal: *//p' /proc/meminfo; echo \"$HOME\"; for d in /boot/firmware /boot; do if [ -f \"$d/config.txt\" ]; then echo \"$d\"; break; fi; done"), "{log}");
    assert!(
        lines[1].ends_with("cat /boot/firmware/config.txt") && lines[2].ends_with("cat /boot/firmware/cmdline.txt")
    );
    assert!(lines[4].ends_with("pi@raspberrypi.local:/home/pi/.bramble-deploy/"), "{log}");
    assert!(lines[5].ends_with("sudo sh -s"));
    assert!(lines[6].ends_with("curl -fsS --max-time 5 http://127.0.0.1:8080/health"), "{log}");
    assert_eq!(board.read("curls").trim(), "2", "polled until the daemon answered");

    // What went up: the binary, the model under its own name, the config, the unit, the edited boot files.
    let uploaded = board.dir.join("uploaded");
    assert_eq!(std::fs::read(uploaded.join("brambled")).unwrap(), fake_elf(183), "uploaded as brambled");
    assert_eq!(std::fs::read(uploaded.join("tiny.bramble")).unwrap(), std::fs::read(board.card.model()).unwrap());
    let config = board.read("uploaded/brambled.toml");
    assert!(config.contains("model = \"/var/lib/brambled/tiny.bramble\"") && config.contains("threads = 4"));
    bramble_tools::flash::check_board_config(&config).unwrap();
    assert!(board.read("uploaded/config.txt").ends_with("enable_uart=1\ndtoverlay=disable-bt\n"));
    assert!(board.read("uploaded/cmdline.txt").starts_with("console=tty1 root=PARTUUID="));

    // The root script: valid sh; the user, the files, the boot files with backups, the unit, the restart.
    let syntax = Command::new("sh").arg("-n").arg(board.dir.join("script.sh")).output().unwrap();
    assert!(syntax.status.success(), "sh -n: {}", String::from_utf8_lossy(&syntax.stderr));
    let script = board.read("script.sh");
    for line in [
        "staging=/home/pi/.bramble-deploy",
        "id -u brambled >/dev/null 2>&1 || useradd --system",
        "install -m 0755 \"$staging/brambled\" /usr/local/bin/brambled",
        "install -m 0644 \"$staging/\"tiny.bramble /var/lib/brambled/tiny.bramble",
        "install -m 0640 -g brambled \"$staging/brambled.toml\" /etc/brambled.toml",
        "[ -e /boot/firmware/cmdline.txt.bramble-bak ] || cp -p /boot/firmware/cmdline.txt /boot/firmware/cmdline.txt.bramble-bak",
        "cat \"$staging/\"config.txt > /boot/firmware/config.txt",
        "systemctl daemon-reload\nsystemctl enable brambled.service\nsystemctl restart brambled.service",
    ] {
        assert!(script.contains(line), "{line:?} not in the script:\n{script}");
    }
}

#[test]
fn deploy_dry_run_prints_the_commands_and_runs_nothing() {
    let board = FakeBoard::new();
    let output = board.deploy_with(Path::new("/nonexistent/ssh"), Path::new("/nonexistent/scp"), &["--dry-run"], &[]);
    let stdout = succeeded(&output);
    for expected in [
        "plan (dry run: nothing runs on pi@raspberrypi.local):",
        "/nonexistent/ssh -o BatchMode=yes pi@raspberrypi.local 'uname -m;",
        "/nonexistent/ssh -o BatchMode=yes pi@raspberrypi.local 'mkdir -p /home/pi/.bramble-deploy'",
        "/nonexistent/scp -q -o BatchMode=yes ",
        " pi@raspberrypi.local:/home/pi/.bramble-deploy/",
        "/nonexistent/ssh -o BatchMode=yes pi@raspberrypi.local 'sudo sh -s'",
        "      | systemctl restart brambled.service",
        "/nonexistent/ssh -o BatchMode=yes pi@raspberrypi.local 'curl -fsS --max-time 5 http://127.0.0.1:8080/health'",
        "dry run: nothing was run",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in the plan:\n{stdout}");
    }
    assert!(!board.dir.join("log").exists(), "the dry run ran a command");
}

#[test]
fn deploy_refuses_a_board_that_is_not_aarch64() {
    let board = FakeBoard::new();
    let stderr = failed(&board.deploy(&[], &[("FAKE_MACHINE", "armv7l")]));
    assert!(
        stderr.contains("pi@raspberrypi.local runs armv7l (uname -m); brambled needs a 64-bit Raspberry Pi OS"),
        "{stderr}"
    );
    assert!(!board.dir.join("uploaded").exists() && !board.dir.join("script.sh").exists());
}
