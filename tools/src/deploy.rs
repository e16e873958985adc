//! `bramble deploy`: install or update `brambled`, a model and its
//! configuration on a running Raspberry Pi over the system's `ssh` and `scp`,
//! restart the service and wait for its `/health`.
//!
//! It does on a live board what [`crate::flash`] does on a card, with the
//! board's own tools: a probe (`uname -m`, `MemTotal`, the home directory,
//! where the boot partition is mounted: `/boot/firmware` on bookworm,
//! `/boot` before), the same preflight (aarch64 executable; the model fits
//! the memory, whose size the probe gives when the profile does not), an
//! upload into `~/.bramble-deploy`, then one `sudo sh -s` script: `useradd`
//! for the system user, `install` into place, the unit enabled, the serial
//! getty masked, `systemctl restart`. `config.txt` and `cmdline.txt` are
//! fetched, edited here by the same functions as `flash` (so the same lines),
//! backed up on the board once and replaced only when they change; those
//! changes take effect at the next boot, which deploy does not force (it
//! says so). Last, it polls `http://<the config's HTTP address>/health` on
//! the board (`curl` over ssh) until it answers or the timeout passes.
//!
//! `--dry-run` contacts nothing and prints the commands, the probe's
//! results shown as the shell variables they will fill.

use crate::flash::{self, board_paths, BoardArgs, BACKUP_SUFFIX};
use crate::profiles::{self, BoardProfile};
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `bramble deploy`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The running board, as ssh takes it (user@host); the user needs sudo there.
    #[arg(long)]
    pub host: String,
    /// The model image to install.
    #[arg(long)]
    pub model: PathBuf,
    /// The board, the daemon and its configuration.
    #[command(flatten)]
    pub board: BoardArgs,
    /// Print the commands and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave config.txt and cmdline.txt alone (the serial console stays as it is).
    #[arg(long)]
    pub no_uart: bool,
    /// How the board is reached and how long its restart may take.
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// A file holding the Bearer token the daemon will require of every TCP
    /// request (`tcp.auth_token`; needed when `--http` or `--ndjson` is off loopback).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
}

/// What `deploy` and `fleet --hosts` need to reach a board.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Seconds to wait for /health after the restart.
    #[arg(long, default_value_t = 120)]
    pub health_timeout: u64,
    /// The ssh program.
    #[arg(long, default_value = "ssh")]
    pub ssh: String,
    /// The scp program.
    #[arg(long, default_value = "scp")]
    pub scp: String,
}

/// The token in `path`: one line of 16 or more printable ASCII characters
/// (no quotes or backslashes, which the TOML string would have to escape).
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\') {
        bail!(
            "{}: the token must be one line of at least 16 printable ASCII characters without quotes or backslashes",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// The staging directory on the board, under the ssh user's home.
pub const STAGING: &str = ".bramble-deploy";

/// What the probe learned about the board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `uname -m`.
    pub machine: String,
    /// `MemTotal` of `/proc/meminfo`, bytes (a little less than the installed memory).
    pub memory_total_bytes: u64,
    /// The ssh user's home directory.
    pub home: String,
    /// Where the boot partition is mounted, if it holds a `config.txt`.
    pub boot: Option<String>,
}

/// The command that probes the board (its output is read by [`Probe::parse`]).
pub const PROBE: &str = "uname -m; sed -n 's/^MemTotal: *//p' /proc/meminfo; echo \"$HOME\"; \
for d in /boot/firmware /boot; do if [ -f \"$d/config.txt\" ]; then echo \"$d\"; break; fi; done";

impl Probe {
    /// Reads the probe's four lines (the last may be missing: no boot partition found).
    pub fn parse(output: &str) -> Result<Probe, String> {
        let lines: Vec<&str> = output.lines().map(str::trim).collect();
        if lines.len() < 3 {
            return Err(format!("the board's probe answered {output:?}, not machine, memory and home"));
        }
        let memory = lines[1]
            .strip_suffix("kB")
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("the board's MemTotal {:?} is not \"N kB\"", lines[1]))?;
        Ok(Probe {
            machine: lines[0].to_string(),
            memory_total_bytes: memory * 1024,
            home: lines[2].to_string(),
            boot: lines.get(3).filter(|l| !l.is_empty()).map(|l| l.to_string()),
        })
    }
}

/// Quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c)) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The board profile with the memory the board reports, unless the user named one:
/// the smallest size the family is sold with that holds `MemTotal`.
pub fn profile_for(board: &BoardArgs, probe: &Probe) -> Result<BoardProfile> {
    let named = profiles::profile(&board.profile, board.memory.as_deref()).map_err(|e| anyhow!(e))?;
    if board.memory.is_some() || named.name != named.family {
        return Ok(named);
    }
    let fitting = named.memory_variants.iter().copied().find(|&m| m >= probe.memory_total_bytes);
    let Some(memory) = fitting else { return Ok(named) };
    let mut profile = named.clone();
    profile.memory_bytes = memory;
    profile.name = format!(
        "{}-{}",
        named.family,
        if memory >= 1 << 30 { format!("{}gb", memory >> 30) } else { format!("{}mb", memory >> 20) }
    );
    Ok(profile)
}

/// The root script run on the board with `sudo sh -s`: the user, the files,
/// the boot files (when `boot_edits` names them), the unit; then the restart.
pub fn install_script(
    staging: &str,
    model_file: &str,
    boot: Option<&str>,
    boot_edits: &[&str],
    board: &BoardProfile,
) -> String {
    let q = shell_quote;
    let user = board_paths::USER;
    let mut script = format!(
        "set -eu\nstaging={staging}\n\
         # The system user, as flash writes it: no login, no home created, in dialout.\n\
         getent group {user} >/dev/null || groupadd --system {user}\n\
         id -u {user} >/dev/null 2>&1 || useradd --system --gid {user} --home-dir {home} --no-create-home \
         --shell /usr/sbin/nologin --comment 'Bramble LLM daemon' {user}\n\
         usermod --append --groups dialout {user}\n\
         install -d -m 0755 {model_dir}\n\
         install -m 0755 \"$staging/brambled\" {binary}\n\
         install -m 0644 \"$staging/\"{model} {model_path}\n\
         # The first config this replaces is kept.\n\
         if [ -e {config} ] && [ ! -e {config}{backup} ] && ! cmp -s \"$staging/brambled.toml\" {config}; then \
         cp -p {config} {config}{backup}; fi\n\
         # The config may hold the auth token: readable by the daemon's group only.\n\
         install -m 0640 -g {user} \"$staging/brambled.toml\" {config}\n\
         install -m 0644 \"$staging/brambled.service\" {unit}\n",
        staging = q(staging),
        home = board_paths::HOME,
        model_dir = board_paths::MODEL_DIR,
        binary = board_paths::BINARY,
        model = q(model_file),
        model_path = q(&format!("{}/{model_file}", board_paths::MODEL_DIR)),
        config = board_paths::CONFIG,
        backup = BACKUP_SUFFIX,
        unit = board_paths::UNIT,
    );
    if let Some(boot) = boot {
        for file in boot_edits {
            let target = q(&format!("{boot}/{file}"));
            let backup = q(&format!("{boot}/{file}{BACKUP_SUFFIX}"));
            script.push_str(&format!(
                "[ -e {backup} ] || cp -p {target} {backup}\ncat \"$staging/\"{file} > {target}\n",
                file = q(file)
            ));
        }
    }
    // The serial getty (and Bluetooth's UART setup) would open the port too.
    let mut masked = vec![format!("serial-getty@{}.service", board.uart_kernel_name)];
    masked.extend(board.masked_services.iter().map(|s| s.to_string()));
    script.push_str(&format!(
        "systemctl mask {masked}\nsystemctl stop {getty} 2>/dev/null || true\n\
         systemctl daemon-reload\nsystemctl enable brambled.service\nsystemctl restart brambled.service\n\
         rm -rf \"$staging\"\n",
        masked = masked.join(" "),
        getty = masked[0],
    ));
    script
}

/// The `/health` URL on the board for the config's HTTP address (`None`: no HTTP listener).
pub fn health_url(http: &str) -> Result<Option<String>> {
    match http.trim() {
        "" | "none" | "off" => Ok(None),
        address => {
            let address: std::net::SocketAddr =
                address.parse().map_err(|_| anyhow!("--http {address:?} is not ADDR:PORT"))?;
            let host = if address.ip().is_unspecified() { "127.0.0.1".to_string() } else { address.ip().to_string() };
            let host = if address.is_ipv6() && host != "127.0.0.1" { format!("[{host}]") } else { host };
            Ok(Some(format!("http://{host}:{}/health", address.port())))
        }
    }
}

/// One command, shown as a shell line and run (or only shown, in a dry run).
struct Runner<'a> {
    args: &'a DeployArgs,
}

impl Runner<'_> {
    fn ssh(&self, remote: &str) -> Vec<String> {
        vec![
            self.args.remote.ssh.clone(),
            "-o".into(),
            "BatchMode=yes".into(),
            self.args.host.clone(),
            remote.to_string(),
        ]
    }

    fn show(argv: &[String]) -> String {
        argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
    }

    /// Runs `argv` (with `input` on stdin); its stdout, or an error with its stderr.
    fn run(&self, argv: &[String], input: Option<&str>) -> Result<String> {
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("running {}", argv[0]))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).with_context(|| format!("writing to {}", argv[0]))?;
        }
        let output = child.wait_with_output().with_context(|| format!("running {}", argv[0]))?;
        if !output.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                Self::show(argv),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// `bramble deploy`.
pub fn run(args: DeployArgs) -> Result<()> {
    let runner = Runner { args: &args };
    let named = profiles::profile(&args.board.profile, args.board.memory.as_deref()).map_err(|e| anyhow!(e))?;
    let brambled = flash::find_brambled(args.board.brambled.as_deref())?;
    flash::architecture_preflight(&brambled, &named)?;
    let model_board_path = flash::board_model_path(&args.model)?;
    let model_file = model_board_path.rsplit('/').next().unwrap_or_default().to_string();
    let health = health_url(&args.board.http)?;

    let probe = if args.dry_run {
        println!("plan (dry run: nothing runs on {}):", args.host);
        println!("  {}", Runner::show(&runner.ssh(PROBE)));
        None
    } else {
        let answer = runner.run(&runner.ssh(PROBE), None)?;
        let probe = Probe::parse(&answer).map_err(|e| anyhow!("{}: {e}", args.host))?;
        if probe.machine != "aarch64" {
            bail!("{} runs {} (uname -m); brambled needs a 64-bit Raspberry Pi OS (aarch64)", args.host, probe.machine);
        }
        Some(probe)
    };
    let board = match &probe {
        Some(probe) => profile_for(&args.board, probe)?,
        None => named,
    };
    let memory = flash::memory_preflight(&args.model, args.board.context, args.board.kv, &board)?;
    println!("board: {} ({}), kernels {}", board.name, board.description, board.expected_kernels);
    println!("memory: {memory}");

    // The files to upload, made here.
    let local = tempfile::tempdir().context("a temporary directory")?;
    let config = flash::board_config(
        &board,
        &model_board_path,
        (args.board.context, args.board.kv),
        &args.board.http,
        &args.board.ndjson,
    );
    let config = match &args.auth_token_file {
        // `[tcp]` is the generated config's last table.
        Some(path) => format!("{config}auth_token = \"{}\"  # from --auth-token-file\n", read_token(path)?),
        None => config,
    };
    flash::check_board_config(&config)?;
    std::fs::write(local.path().join("brambled.toml"), &config).context("writing the config")?;
    std::fs::write(local.path().join("brambled.service"), flash::UNIT_TEXT).context("writing the unit")?;

    // A dry run shows the home ssh's user most likely has; a real run uses the probed one.
    let home = match &probe {
        Some(probe) => probe.home.trim_end_matches('/').to_string(),
        None => {
            match args.host.split_once('@').map(|(user, _)| user.to_string()).or_else(|| std::env::var("USER").ok()) {
                Some(user) if user == "root" => "/root".to_string(),
                Some(user) => format!("/home/{user}"),
                None => "/home/pi".to_string(),
            }
        }
    };
    let staging = format!("{home}/{STAGING}");
    let boot = probe.as_ref().and_then(|probe| probe.boot.clone());
    let mut boot_edits: Vec<&str> = Vec::new();
    if args.no_uart {
        println!("--no-uart: config.txt and cmdline.txt are left as they are");
    } else if args.dry_run {
        println!(
            "  # then config.txt and cmdline.txt are fetched (cat) from the boot partition the probe finds \
             (/boot/firmware or /boot), edited here as flash edits them, and uploaded and replaced if they change"
        );
    } else if let Some(boot_dir) = &boot {
        let fetch =
            |file: &str| runner.run(&runner.ssh(&format!("cat {}", shell_quote(&format!("{boot_dir}/{file}")))), None);
        if let Some(edited) = flash::edit_config_txt(&fetch("config.txt")?, board.config_txt_lines) {
            std::fs::write(local.path().join("config.txt"), edited).context("writing config.txt")?;
            boot_edits.push("config.txt");
        }
        let cmdline = fetch("cmdline.txt")?;
        if let Some(edited) = flash::edit_cmdline_txt(&cmdline).map_err(|e| anyhow!("{}: {e}", args.host))? {
            std::fs::write(local.path().join("cmdline.txt"), edited).context("writing cmdline.txt")?;
            boot_edits.push("cmdline.txt");
        }
    } else {
        println!("{}: no config.txt in /boot/firmware or /boot; the UART settings are left as they are", args.host);
    }

    let mut upload: Vec<String> = vec![args.remote.scp.clone(), "-q".into(), "-o".into(), "BatchMode=yes".into()];
    // scp names the remote file after the local one: links give the binary and the model their board names.
    let model_link = local.path().join(&model_file);
    std::os::unix::fs::symlink(std::fs::canonicalize(&args.model).context("the model")?, &model_link)
        .context("linking the model for the upload")?;
    let brambled_link = local.path().join("brambled");
    std::os::unix::fs::symlink(std::fs::canonicalize(&brambled).context("brambled")?, &brambled_link)
        .context("linking brambled for the upload")?;
    upload.push(brambled_link.display().to_string());
    upload.push(model_link.display().to_string());
    for file in ["brambled.toml", "brambled.service"].iter().chain(boot_edits.iter()) {
        upload.push(local.path().join(file).display().to_string());
    }
    upload.push(format!("{}:{}/", args.host, staging));
    let script = install_script(&staging, &model_file, boot.as_deref(), &boot_edits, &board);
    let steps: Vec<(Vec<String>, Option<&str>)> = vec![
        (runner.ssh(&format!("mkdir -p {}", shell_quote(&staging))), None),
        (upload, None),
        (runner.ssh("sudo sh -s"), Some(script.as_str())),
    ];
    for (argv, input) in &steps {
        println!("  {}", Runner::show(argv));
        if args.dry_run {
            if let Some(text) = input {
                for line in text.lines() {
                    println!("      | {line}");
                }
            }
            continue;
        }
        runner.run(argv, *input)?;
    }
    let Some(url) = health else {
        println!("no HTTP listener configured (--http none): not waiting for /health");
        return Ok(());
    };
    let check = runner.ssh(&format!("curl -fsS --max-time 5 {url}"));
    println!("  {}   # until it answers, at most {} s", Runner::show(&check), args.remote.health_timeout);
    if args.dry_run {
        println!("dry run: nothing was run");
        return Ok(());
    }
    let started = Instant::now();
    let answer = loop {
        match runner.run(&check, None) {
            Ok(answer) if answer.contains("\"status\":\"ok\"") => break answer,
            Ok(answer) if started.elapsed().as_secs() >= args.remote.health_timeout => {
                bail!("{}: brambled's /health said {answer:?} after {} s", args.host, args.remote.health_timeout)
            }
            Err(error) if started.elapsed().as_secs() >= args.remote.health_timeout => {
                bail!(
                    "{}: brambled did not answer /health within {} s ({error}); see `journalctl -u brambled` there",
                    args.host,
                    args.remote.health_timeout
                )
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    println!("{}: brambled is healthy: {}", args.host, answer.trim());
    if !boot_edits.is_empty() {
        println!(
            "{}: {} changed (backups *.bramble-bak); the UART console moves to brambled at the next boot: ssh {} sudo reboot",
            args.host,
            boot_edits.join(" and "),
            args.host
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_read() {
        let probe = Probe::parse("aarch64\n3884000 kB\n/home/pi\n/boot/firmware\n").unwrap();
        assert_eq!(probe.memory_total_bytes, 3_884_000 * 1024);
        assert_eq!(probe.boot.as_deref(), Some("/boot/firmware"));
        assert_eq!(Probe::parse("aarch64\n3884000 kB\n/home/pi\n").unwrap().boot, None);
        assert!(Probe::parse("aarch64\nlots\n/home/pi\n").unwrap_err().contains("MemTotal"));
        assert!(Probe::parse("").is_err());
    }

    #[test]
    fn the_memory_size_comes_from_memtotal_unless_named() {
        let probe = Probe::parse("aarch64\n3884000 kB\n/home/pi\n/boot\n").unwrap();
        let board = |profile: &str, memory: Option<&str>| BoardArgs {
            profile: profile.to_string(),
            memory: memory.map(str::to_string),
            brambled: None,
            context: 2048,
            kv: bramble_runtime::kv::KvMode::F32,
            http: "127.0.0.1:8080".to_string(),
            ndjson: "127.0.0.1:8081".to_string(),
        };
        let profile = profile_for(&board("pi4", None), &probe).unwrap();
        assert_eq!((profile.name.as_str(), profile.memory_bytes), ("pi4-4gb", 4 << 30));
        assert_eq!(profile_for(&board("pi4-8gb", None), &probe).unwrap().memory_bytes, 8 << 30);
        assert_eq!(profile_for(&board("pi4", Some("2G")), &probe).unwrap().memory_bytes, 2 << 30);
    }

    #[test]
    fn the_install_script_installs_enables_and_restarts() {
        let board = profiles::profile("pi4", None).unwrap();
        let script =
            install_script("/home/pi/.bramble-deploy", "m.bramble", Some("/boot/firmware"), &["config.txt"], &board);
        for line in [
            "useradd --system --gid brambled --home-dir /var/lib/brambled --no-create-home --shell /usr/sbin/nologin",
            "usermod --append --groups dialout brambled",
            "install -m 0755 \"$staging/brambled\" /usr/local/bin/brambled",
            "install -m 0644 \"$staging/\"m.bramble /var/lib/brambled/m.bramble",
            "install -m 0644 \"$staging/brambled.service\" /etc/systemd/system/brambled.service",
            "[ -e /boot/firmware/config.txt.bramble-bak ] || cp -p /boot/firmware/config.txt /boot/firmware/config.txt.bramble-bak",
            "systemctl mask serial-getty@ttyAMA0.service hciuart.service",
            "systemctl enable brambled.service\nsystemctl restart brambled.service",
        ] {
            assert!(script.contains(line), "{line:?} not in\n{script}");
        }
        assert!(!script.contains("cmdline.txt"), "only the edited boot files are replaced");
    }

    #[test]
    fn quoting_and_health_urls() {
        assert_eq!(shell_quote("/home/pi/.bramble-deploy"), "/home/pi/.bramble-deploy");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$HOME/x"), "'$HOME/x'");
        assert_eq!(health_url("127.0.0.1:8080").unwrap().unwrap(), "http://127.0.0.1:8080/health");
        assert_eq!(health_url("0.0.0.0:9000").unwrap().unwrap(), "http://127.0.0.1:9000/health");
        assert_eq!(health_url("none").unwrap(), None);
        assert!(health_url("localhost").is_err());
    }
}
