//! `bramble flash`: install `brambled`, a model and its configuration into a
//! mounted Raspberry Pi OS SD card (its boot and root partitions), so that the
//! board boots into a daemon that answers on its serial console and on its
//! loopback TCP ports.
//!
//! What it does (`docs/flash.md` has the details and how to undo it):
//!
//! - rootfs: `/usr/local/bin/brambled` (0755), the model in
//!   `/var/lib/brambled/` (0644), `/etc/brambled.toml` generated from the board
//!   profile (0644), `board/brambled.service` as
//!   `/etc/systemd/system/brambled.service`, enabled by the symlink in
//!   `multi-user.target.wants`; the system user and group `brambled` (in
//!   `dialout`) written into `etc/passwd`, `etc/group`, `etc/shadow` and
//!   `etc/gshadow` (no `useradd` can run on a card); the serial getty and,
//!   where the profile says so, Bluetooth's UART setup masked.
//! - boot: `config.txt` gets the profile's UART lines under `[all]`
//!   (`enable_uart=1`, `dtoverlay=disable-bt` on a Pi 4), `cmdline.txt` loses
//!   its serial `console=` so the kernel and getty leave the port to the daemon.
//!
//! Every step first checks whether it is already done, so a second run
//! changes nothing. An existing file is backed up once, to `NAME.bramble-bak`,
//! before its first change: the backup is always the card's original. The
//! executable and the model are not backed up (they are ours and rebuilt at
//! will). Before anything is written, the preflight checks that the two trees
//! are a Raspberry Pi OS (naming what is missing), that `brambled` is an
//! aarch64 executable, and that the model fits the board's memory with its KV
//! cache ([`crate::profiles::memory_plan`]).

use crate::profiles::{self, BoardProfile, ElfArchitecture, MemoryPlan, ModelFootprint};
use anyhow::{anyhow, bail, Context, Result};
use bramble_runtime::kv::KvMode;
use bramble_runtime::ModelImage;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the daemon lives on the board (paths inside the root partition).
pub mod board_paths {
    /// The daemon's executable.
    pub const BINARY: &str = "/usr/local/bin/brambled";
    /// The directory of the model image (the unit's `ReadOnlyPaths`).
    pub const MODEL_DIR: &str = "/var/lib/brambled";
    /// The configuration (the unit's `ExecStart --config`).
    pub const CONFIG: &str = "/etc/brambled.toml";
    /// The systemd unit.
    pub const UNIT: &str = "/etc/systemd/system/brambled.service";
    /// The symlink that enables the unit (what `systemctl enable` makes).
    pub const UNIT_ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/brambled.service";
    /// The system user and group the unit runs as.
    pub const USER: &str = "brambled";
    /// The system user's home (never created: the daemon writes nothing).
    pub const HOME: &str = "/var/lib/brambled";
}

/// The systemd unit installed on the board: the repository's own.
pub const UNIT_TEXT: &str = include_str!("../../board/brambled.service");

/// The suffix of a backup: `config.txt` → `config.txt.bramble-bak`.
pub const BACKUP_SUFFIX: &str = ".bramble-bak";

/// Serial consoles removed from `cmdline.txt` (the Pi's UART names).
const SERIAL_CONSOLES: [&str; 6] = ["serial0", "serial1", "ttyAMA0", "ttyAMA10", "ttyS0", "ttyAMA1"];

/// `bramble flash`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct FlashArgs {
    /// The mounted boot partition (holds config.txt, cmdline.txt, the firmware and *.dtb).
    #[arg(long)]
    pub boot: PathBuf,
    /// The mounted root partition (holds etc/os-release, etc/passwd).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// The model image to install.
    #[arg(long)]
    pub model: PathBuf,
    /// The board, the daemon and its configuration.
    #[command(flatten)]
    pub board: BoardArgs,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What `flash` and `deploy` share: the board, the daemon and its configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct BoardArgs {
    /// Board profile: pi4, pi5, pi-zero-2w, or with a memory size (pi4-8gb).
    #[arg(long, default_value = "pi4")]
    pub profile: String,
    /// The board's memory (4G, 512M), when the profile name does not give it.
    #[arg(long)]
    pub memory: Option<String>,
    /// The aarch64 `brambled` (default: build it with cargo for aarch64-unknown-linux-gnu).
    #[arg(long)]
    pub brambled: Option<PathBuf>,
    /// KV-cache positions the daemon allocates (at most the model's context).
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// How the daemon stores the KV cache: f32, f16, q8 or q4 (docs/kv.md); the
    /// memory check plans this cache.
    #[arg(long, default_value = "f32")]
    pub kv: KvMode,
    /// The daemon's HTTP address on the board.
    #[arg(long, default_value = bramble_board::config::DEFAULT_HTTP)]
    pub http: String,
    /// The daemon's NDJSON address on the board.
    #[arg(long, default_value = bramble_board::config::DEFAULT_NDJSON)]
    pub ndjson: String,
}

/// The board-side config file `brambled` reads, generated from the profile.
pub fn board_config(
    profile: &BoardProfile,
    model_path: &str,
    (context, kv): (usize, KvMode),
    http: &str,
    ndjson: &str,
) -> String {
    format!(
        "# brambled's configuration, written by `bramble flash`/`bramble deploy` for the {name} profile
# ({description}). Every key is explained in the repository's board/brambled.toml.
# It is rewritten on the next flash or deploy (the first version it replaced is {config}{backup}).
model = \"{model_path}\"
threads = {threads}         # the board's cores
context = {context}      # KV-cache positions
kv = \"{kv}\"             # how the KV cache is stored: f32, f16, q8 or q4
log_level = \"info\"

[uart]
device = \"{uart}\"  # the PL011 on GPIO 14 (TXD) and 15 (RXD)
baud = 115200

[tcp]
http = \"{http}\"
ndjson = \"{ndjson}\"
",
        name = profile.name,
        description = profile.description,
        config = board_paths::CONFIG,
        backup = BACKUP_SUFFIX,
        threads = profile.cores,
        uart = profile.uart_device,
    )
}

/// Checks `text` as the daemon will: the same parser, the same validation.
pub fn check_board_config(text: &str) -> Result<()> {
    use bramble_board::config::{Config, Overrides};
    Config::from_parts(Some((Path::new(board_paths::CONFIG), text)), &Overrides::default())
        .map_err(|e| anyhow!("the generated config would not load on the board: {e}"))?;
    Ok(())
}

/// Adds the profile's `lines` to `config.txt` where they are missing, under
/// an `[all]` section; `None` when every line is already in effect.
///
/// A line counts when it appears in the `[all]` scope (before any section
/// filter, or after `[all]`). A `key=value` setting (`enable_uart=1`) whose key
/// has another value there is changed in place, with a note on the line before (the
/// firmware takes the last value, and config.txt has no trailing comments); `dtoverlay=`/`dtparam=` lines, which accumulate, are only added.
pub fn edit_config_txt(text: &str, lines: &[&str]) -> Option<String> {
    let mut out: Vec<String> = text.lines().map(str::to_string).collect();
    let mut missing = Vec::new();
    for wanted in lines {
        let (key, _) = wanted.split_once('=').unwrap_or((wanted, ""));
        let accumulates = key == "dtoverlay" || key == "dtparam";
        let mut in_all = true;
        let mut present = false;
        let mut last_setting = None;
        for (index, line) in out.iter().enumerate() {
            let setting = line.split('#').next().unwrap_or("").trim();
            if setting.starts_with('[') {
                in_all = setting.eq_ignore_ascii_case("[all]");
                continue;
            }
            if !in_all {
                continue;
            }
            if setting == *wanted {
                present = true;
            }
            if !accumulates && setting.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
                last_setting = Some(index);
            }
        }
        match last_setting {
            // The last value in effect is another one: change it where it is.
            // config.txt has no trailing comments: the note goes on a line of its own.
            Some(index) if !accumulates && out[index].split('#').next().unwrap_or("").trim() != *wanted => {
                let note = format!("# bramble flash: was {}", out[index].trim());
                out[index] = wanted.to_string();
                out.insert(index, note);
            }
            _ if present => {}
            _ => missing.push(*wanted),
        }
    }
    let changed_in_place = out.iter().zip(text.lines()).any(|(a, b)| a != b);
    if missing.is_empty() && !changed_in_place {
        return None;
    }
    if !missing.is_empty() {
        let section_is_all = out
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| l.starts_with('['))
            .is_none_or(|s| s.eq_ignore_ascii_case("[all]"));
        if out.last().is_some_and(|l| !l.trim().is_empty()) {
            out.push(String::new());
        }
        if !section_is_all {
            out.push("[all]".to_string());
        }
        out.push("# bramble flash: the PL011 UART on GPIO 14/15 for brambled's serial console".to_string());
        out.extend(missing.iter().map(|l| l.to_string()));
    }
    let mut edited = out.join("\n");
    edited.push('\n');
    Some(edited)
}

/// Removes the serial `console=` entries from `cmdline.txt` (keeping
/// `console=tty1` and every other parameter, on one line); `None` when there
/// are none. An error when the file is not one line, as the firmware needs.
pub fn edit_cmdline_txt(text: &str) -> Result<Option<String>, String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != 1 {
        return Err(format!(
            "cmdline.txt has {} non-empty lines; the kernel command line must be exactly one",
            lines.len()
        ));
    }
    let is_serial = |parameter: &&str| {
        parameter.strip_prefix("console=").is_some_and(|device| {
            let name = device.split(',').next().unwrap_or("");
            SERIAL_CONSOLES.contains(&name)
        })
    };
    let parameters: Vec<&str> = lines[0].split_whitespace().collect();
    if !parameters.iter().any(is_serial) {
        return Ok(None);
    }
    let kept: Vec<&str> = parameters.into_iter().filter(|p| !is_serial(p)).collect();
    Ok(Some(format!("{}\n", kept.join(" "))))
}

/// The account files of a root partition, as text (`gshadow` if it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountFiles {
    /// `etc/passwd`.
    pub passwd: String,
    /// `etc/group`.
    pub group: String,
    /// `etc/shadow`.
    pub shadow: String,
    /// `etc/gshadow`.
    pub gshadow: Option<String>,
}

fn field(line: &str, index: usize) -> Option<&str> {
    line.split(':').nth(index)
}

fn find_entry<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find(|l| field(l, 0) == Some(name))
}

fn with_line(text: &str, line: &str) -> String {
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

/// Adds `user` to the member list (field `members_field`) of `group`'s line.
fn with_member(text: &str, group: &str, members_field: usize, user: &str, file: &str) -> Result<String, String> {
    if find_entry(text, group).is_none() {
        return Err(format!("{file} has no {group} group (a Raspberry Pi OS root partition has one)"));
    }
    let mut out = String::with_capacity(text.len() + user.len() + 1);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let mut fields: Vec<String> = body.split(':').map(str::to_string).collect();
        if fields.first().map(String::as_str) == Some(group) && fields.len() > members_field {
            let members = &mut fields[members_field];
            if !members.split(',').any(|m| m == user) {
                if !members.is_empty() {
                    members.push(',');
                }
                members.push_str(user);
            }
            out.push_str(&fields.join(":"));
            out.push_str(&line[body.len()..]);
        } else {
            out.push_str(line);
        }
    }
    Ok(out)
}

/// The account files with the system user `user` (home `home`, no login, a
/// locked password) and its group, the user also in `dialout`: the same
/// lines `useradd --system --user-group --groups dialout` writes. The ids are
/// the highest free below 1000 (as `useradd --system` picks them), the same
/// number for user and group; an existing user or group keeps its id.
/// `days` is the password's last change (days since 1970) for `shadow`.
pub fn add_system_user(files: &AccountFiles, user: &str, home: &str, days: u64) -> Result<AccountFiles, String> {
    let ids = |text: &str, index: usize| -> Vec<u32> {
        text.lines().filter_map(|l| field(l, index)?.parse().ok()).collect::<Vec<u32>>()
    };
    let (uids, gids) = (ids(&files.passwd, 2), ids(&files.group, 2));
    let existing_uid = find_entry(&files.passwd, user).and_then(|l| field(l, 2)?.parse::<u32>().ok());
    let existing_gid = find_entry(&files.group, user).and_then(|l| field(l, 2)?.parse::<u32>().ok());
    let free = (100..1000u32)
        .rev()
        .find(|id| !uids.contains(id) && !gids.contains(id))
        .ok_or("etc/passwd and etc/group leave no system id (100-999) free")?;
    let gid = existing_gid.unwrap_or(free);
    let uid = existing_uid.unwrap_or(if uids.contains(&gid) { free } else { gid });

    let mut out = files.clone();
    if find_entry(&out.group, user).is_none() {
        out.group = with_line(&out.group, &format!("{user}:x:{gid}:"));
    }
    if find_entry(&out.passwd, user).is_none() {
        out.passwd =
            with_line(&out.passwd, &format!("{user}:x:{uid}:{gid}:Bramble LLM daemon:{home}:/usr/sbin/nologin"));
    }
    if find_entry(&out.shadow, user).is_none() {
        out.shadow = with_line(&out.shadow, &format!("{user}:!:{days}::::::"));
    }
    out.group = with_member(&out.group, "dialout", 3, user, "etc/group")?;
    if let Some(gshadow) = &out.gshadow {
        let mut gshadow = gshadow.clone();
        if find_entry(&gshadow, user).is_none() {
            gshadow = with_line(&gshadow, &format!("{user}:!::"));
        }
        if find_entry(&gshadow, "dialout").is_some() {
            gshadow = with_member(&gshadow, "dialout", 3, user, "etc/gshadow")?;
        }
        out.gshadow = Some(gshadow);
    }
    Ok(out)
}

/// What is missing for `boot` to be a Raspberry Pi boot partition (empty: nothing).
pub fn missing_from_boot(boot: &Path) -> Vec<String> {
    let mut missing: Vec<String> =
        ["config.txt", "cmdline.txt"].iter().filter(|f| !boot.join(f).is_file()).map(|f| f.to_string()).collect();
    let firmware = fs::read_dir(boot).map(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".dtb") || (name.starts_with("start") && name.ends_with(".elf"))
        })
    });
    if !firmware.unwrap_or(false) {
        missing.push("firmware (no *.dtb and no start*.elf)".to_string());
    }
    missing
}

/// What is missing for `rootfs` to be a 64-bit Raspberry Pi OS root partition.
pub fn missing_from_rootfs(rootfs: &Path) -> Vec<String> {
    let mut missing: Vec<String> = ["etc/os-release", "etc/passwd", "etc/group", "etc/shadow"]
        .iter()
        .filter(|f| !rootfs.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    if !rootfs.join("usr/lib/aarch64-linux-gnu").is_dir() {
        missing.push(
            "usr/lib/aarch64-linux-gnu (a 64-bit arm64 system; a 32-bit armhf one cannot run the aarch64 brambled)"
                .to_string(),
        );
    }
    missing
}

/// The model's footprint and the memory plan on `board`, or an error showing the arithmetic.
pub fn memory_preflight(model: &Path, context: usize, kv: KvMode, board: &BoardProfile) -> Result<MemoryPlan> {
    let image = ModelImage::open(model).with_context(|| format!("{}: not a valid model image", model.display()))?;
    let image_bytes = fs::metadata(model).with_context(|| model.display().to_string())?.len();
    let footprint = ModelFootprint::of(&image, image_bytes);
    kv.check(image.config()).with_context(|| format!("{}: --kv {kv}", model.display()))?;
    let plan = profiles::memory_plan_with_kv(&footprint, context, board, kv);
    if !plan.fits() {
        bail!(
            "{} does not fit the {}: {plan}. Give a smaller --context, --kv q4, a smaller model, or a board with \
             more memory (--profile {}-8gb or --memory)",
            model.display(),
            board.description,
            board.family
        );
    }
    Ok(plan)
}

/// Refuses a `brambled` that is not a 64-bit aarch64 executable.
pub fn architecture_preflight(brambled: &Path, board: &BoardProfile) -> Result<()> {
    let mut header = [0u8; 64];
    let mut file = fs::File::open(brambled).with_context(|| format!("brambled {}", brambled.display()))?;
    let read = file.read(&mut header).with_context(|| brambled.display().to_string())?;
    let arch = ElfArchitecture::read(&header[..read]).map_err(|e| anyhow!("brambled {}: {e}", brambled.display()))?;
    if !arch.is_aarch64() {
        bail!(
            "brambled {} is a {} executable; the {} profile ({}) runs 64-bit aarch64 ones: build it with \
             `cargo build --release --target aarch64-unknown-linux-gnu -p bramble-board`",
            brambled.display(),
            arch.name(),
            board.name,
            board.cpu
        );
    }
    Ok(())
}

/// The aarch64 `brambled`: the one given, or the workspace's, built by cargo
/// (run from inside the Bramble repository).
pub fn find_brambled(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    const TRIPLE: &str = "aarch64-unknown-linux-gnu";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building brambled for {TRIPLE} (give --brambled PATH to skip)");
    let status = std::process::Command::new(&cargo)
        .args(["build", "--release", "--target", TRIPLE, "-p", "bramble-board", "--bin", "brambled"])
        .status()
        .context("running cargo (give --brambled PATH to use a binary built elsewhere)")?;
    if !status.success() {
        bail!(
            "cargo could not build brambled for {TRIPLE} ({status}): run inside the Bramble repository with \
             `apt-get install gcc-aarch64-linux-gnu` and `rustup target add {TRIPLE}` done, or give --brambled PATH"
        );
    }
    let metadata = std::process::Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("reading cargo metadata's answer")?;
    let target =
        metadata["target_directory"].as_str().ok_or_else(|| anyhow!("cargo metadata gave no target_directory"))?;
    Ok(Path::new(target).join(TRIPLE).join("release").join("brambled"))
}

/// Where a board path (`/etc/brambled.toml`) lies under a mounted root.
fn under(root: &Path, board_path: &str) -> PathBuf {
    root.join(board_path.trim_start_matches('/'))
}

/// One thing `flash` makes true on the card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A directory exists.
    Directory {
        /// The directory.
        path: PathBuf,
    },
    /// A file holds a host file's bytes, with `mode` (the executable, the model).
    Copy {
        /// The host file.
        source: PathBuf,
        /// Where it goes.
        destination: PathBuf,
        /// Its permissions.
        mode: u32,
    },
    /// A file holds `contents`; an existing file keeps its mode and owner and is backed up first.
    Write {
        /// The file.
        path: PathBuf,
        /// Its new contents.
        contents: Vec<u8>,
        /// Permissions of a new file.
        mode: u32,
        /// Why, for the plan.
        why: String,
    },
    /// `link` is a symlink to `target` (`/dev/null` masks a unit).
    Symlink {
        /// The link.
        link: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
}

impl Step {
    /// Whether the card already is as this step would make it.
    pub fn is_done(&self) -> Result<bool> {
        Ok(match self {
            Step::Directory { path } => path.is_dir(),
            Step::Copy { source, destination, mode } => {
                mode_is(destination, *mode) && same_contents(source, destination)?
            }
            Step::Write { path, contents, .. } => fs::read(path).map(|c| c == *contents).unwrap_or(false),
            Step::Symlink { link, target } => fs::read_link(link).map(|t| t == *target).unwrap_or(false),
        })
    }

    /// The file, directory or link the step makes.
    pub fn path(&self) -> &Path {
        match self {
            Step::Directory { path } | Step::Write { path, .. } => path,
            Step::Copy { destination, .. } => destination,
            Step::Symlink { link, .. } => link,
        }
    }

    /// What the step does, for the plan.
    pub fn describe(&self) -> String {
        match self {
            Step::Directory { path } => format!("directory {}", path.display()),
            Step::Copy { source, destination, mode } => {
                format!("install   {} ({mode:04o}) from {}", destination.display(), source.display())
            }
            Step::Write { path, mode, why, .. } => {
                let existing = path.exists();
                let backup = backup_path(path);
                if existing && !backup.exists() {
                    format!("edit      {} ({why}; original kept as {})", path.display(), backup.display())
                } else if existing {
                    format!("edit      {} ({why})", path.display())
                } else {
                    format!("write     {} ({mode:04o}, {why})", path.display())
                }
            }
            Step::Symlink { link, target } => format!("symlink   {} -> {}", link.display(), target.display()),
        }
    }

    /// Makes the step true.
    pub fn apply(&self) -> Result<()> {
        match self {
            Step::Directory { path } => fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(path)
                .with_context(|| path.display().to_string()),
            Step::Copy { source, destination, mode } => {
                let temporary = temporary_path(destination);
                fs::copy(source, &temporary)
                    .with_context(|| format!("copying {} to {}", source.display(), temporary.display()))?;
                fs::set_permissions(&temporary, fs::Permissions::from_mode(*mode))
                    .with_context(|| temporary.display().to_string())?;
                fs::rename(&temporary, destination).with_context(|| destination.display().to_string())
            }
            Step::Write { path, contents, mode, .. } => write_with_backup(path, contents, *mode),
            Step::Symlink { link, target } => {
                if let Ok(metadata) = fs::symlink_metadata(link) {
                    if metadata.is_file() {
                        back_up_once(link)?;
                    }
                    fs::remove_file(link).with_context(|| format!("replacing {}", link.display()))?;
                }
                std::os::unix::fs::symlink(target, link).with_context(|| link.display().to_string())
            }
        }
    }
}

fn mode_is(path: &Path, mode: u32) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode)
}

/// Whether two files hold the same bytes (compared in chunks: models are large).
fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let (Ok(meta_a), Ok(meta_b)) = (fs::metadata(a), fs::metadata(b)) else { return Ok(false) };
    if meta_a.len() != meta_b.len() {
        return Ok(false);
    }
    let mut file_a = fs::File::open(a).with_context(|| a.display().to_string())?;
    let mut file_b = fs::File::open(b).with_context(|| b.display().to_string())?;
    let (mut buffer_a, mut buffer_b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let read = file_a.read(&mut buffer_a).with_context(|| a.display().to_string())?;
        if read == 0 {
            return Ok(true);
        }
        file_b.read_exact(&mut buffer_b[..read]).with_context(|| b.display().to_string())?;
        if buffer_a[..read] != buffer_b[..read] {
            return Ok(false);
        }
    }
}

/// `config.txt` → `config.txt.bramble-bak`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(BACKUP_SUFFIX);
    path.with_file_name(name)
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".bramble-tmp");
    path.with_file_name(name)
}

/// Copies `path` to its backup unless a backup exists (the first is the original).
fn back_up_once(path: &Path) -> Result<()> {
    let backup = backup_path(path);
    if !backup.exists() {
        fs::copy(path, &backup).with_context(|| format!("backing up {} to {}", path.display(), backup.display()))?;
    }
    Ok(())
}

/// Writes `contents` to `path` through a temporary file renamed into place;
/// an existing file is backed up once and keeps its mode and owner.
fn write_with_backup(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let existing = fs::metadata(path).ok();
    if existing.is_some() {
        back_up_once(path)?;
    }
    let temporary = temporary_path(path);
    let mut file = fs::File::create(&temporary).with_context(|| temporary.display().to_string())?;
    file.write_all(contents).and_then(|_| file.sync_all()).with_context(|| temporary.display().to_string())?;
    drop(file);
    let (mode, owner) = match &existing {
        Some(metadata) => (metadata.permissions().mode() & 0o7777, Some((metadata.uid(), metadata.gid()))),
        None => (mode, None),
    };
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        .with_context(|| temporary.display().to_string())?;
    if let Some((uid, gid)) = owner {
        let made = fs::metadata(&temporary).with_context(|| temporary.display().to_string())?;
        if (made.uid(), made.gid()) != (uid, gid) {
            std::os::unix::fs::chown(&temporary, Some(uid), Some(gid))
                .with_context(|| format!("{}: keeping the owner {uid}:{gid}", path.display()))?;
        }
    }
    fs::rename(&temporary, path).with_context(|| path.display().to_string())
}

/// Days since 1970 (the `shadow` file's date unit).
fn days_since_epoch() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400)
}

/// The model's file name on the board: its own (the daemon names the model after it).
pub fn board_model_path(model: &Path) -> Result<String> {
    let name = model
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && !n.contains(['"', '\\', '\n']))
        .ok_or_else(|| anyhow!("{}: the model's file name must be plain UTF-8", model.display()))?;
    Ok(format!("{}/{name}", board_paths::MODEL_DIR))
}

/// Everything `flash` would do, checked (preflight) but not done.
pub fn plan(args: &FlashArgs, brambled: &Path, board: &BoardProfile) -> Result<(Vec<Step>, MemoryPlan)> {
    let missing = missing_from_boot(&args.boot);
    if !missing.is_empty() {
        bail!("{} is not a Raspberry Pi OS boot partition: missing {}", args.boot.display(), missing.join(", "));
    }
    let missing = missing_from_rootfs(&args.rootfs);
    if !missing.is_empty() {
        bail!(
            "{} is not a 64-bit Raspberry Pi OS root partition: missing {}",
            args.rootfs.display(),
            missing.join(", ")
        );
    }
    architecture_preflight(brambled, board)?;
    let memory = memory_preflight(&args.model, args.board.context, args.board.kv, board)?;

    let read = |path: PathBuf| fs::read_to_string(&path).with_context(|| path.display().to_string());
    let model_path = board_model_path(&args.model)?;
    let config =
        board_config(board, &model_path, (args.board.context, args.board.kv), &args.board.http, &args.board.ndjson);
    check_board_config(&config)?;

    let root = &args.rootfs;
    let mut steps = vec![
        Step::Directory { path: under(root, "/usr/local/bin") },
        Step::Directory { path: under(root, board_paths::MODEL_DIR) },
        Step::Directory { path: under(root, "/etc/systemd/system/multi-user.target.wants") },
        Step::Copy { source: brambled.to_path_buf(), destination: under(root, board_paths::BINARY), mode: 0o755 },
        Step::Copy { source: args.model.clone(), destination: under(root, &model_path), mode: 0o644 },
        Step::Write {
            path: under(root, board_paths::CONFIG),
            contents: config.into_bytes(),
            mode: 0o644,
            why: format!("brambled's config for {}", board.name),
        },
        Step::Write {
            path: under(root, board_paths::UNIT),
            contents: UNIT_TEXT.as_bytes().to_vec(),
            mode: 0o644,
            why: "the systemd unit".to_string(),
        },
        Step::Symlink { link: under(root, board_paths::UNIT_ENABLED), target: PathBuf::from(board_paths::UNIT) },
    ];
    // The serial getty (and Bluetooth's UART setup) would open the port too.
    let getty = format!("serial-getty@{}.service", board.uart_kernel_name);
    for service in std::iter::once(getty.as_str()).chain(board.masked_services.iter().copied()) {
        steps.push(Step::Symlink {
            link: under(root, &format!("/etc/systemd/system/{service}")),
            target: PathBuf::from("/dev/null"),
        });
    }

    let accounts = AccountFiles {
        passwd: read(root.join("etc/passwd"))?,
        group: read(root.join("etc/group"))?,
        shadow: read(root.join("etc/shadow"))?,
        gshadow: if root.join("etc/gshadow").is_file() { Some(read(root.join("etc/gshadow"))?) } else { None },
    };
    let with_user = add_system_user(&accounts, board_paths::USER, board_paths::HOME, days_since_epoch())
        .map_err(|e| anyhow!("{}: {e}", root.display()))?;
    let mut account_edits = vec![
        ("passwd", &accounts.passwd, &with_user.passwd, 0o644),
        ("group", &accounts.group, &with_user.group, 0o644),
        ("shadow", &accounts.shadow, &with_user.shadow, 0o640),
    ];
    if let (Some(before), Some(after)) = (&accounts.gshadow, &with_user.gshadow) {
        account_edits.push(("gshadow", before, after, 0o640));
    }
    for (name, before, after, mode) in account_edits {
        if before != after {
            steps.push(Step::Write {
                path: root.join("etc").join(name),
                contents: after.clone().into_bytes(),
                mode,
                why: "the system user brambled, in dialout".to_string(),
            });
        }
    }

    let config_txt = args.boot.join("config.txt");
    if let Some(edited) = edit_config_txt(&read(config_txt.clone())?, board.config_txt_lines) {
        steps.push(Step::Write {
            path: config_txt,
            contents: edited.into_bytes(),
            mode: 0o755,
            why: format!("{} under [all]", board.config_txt_lines.join(", ")),
        });
    }
    let cmdline_txt = args.boot.join("cmdline.txt");
    let cmdline = read(cmdline_txt.clone())?;
    if let Some(edited) = edit_cmdline_txt(&cmdline).map_err(|e| anyhow!("{}: {e}", cmdline_txt.display()))? {
        steps.push(Step::Write {
            path: cmdline_txt,
            contents: edited.into_bytes(),
            mode: 0o755,
            why: "no serial console: the port is the daemon's".to_string(),
        });
    }
    Ok((steps, memory))
}

/// `bramble flash`.
pub fn run(args: FlashArgs) -> Result<()> {
    let board = profiles::profile(&args.board.profile, args.board.memory.as_deref()).map_err(|e| anyhow!(e))?;
    let brambled = find_brambled(args.board.brambled.as_deref())?;
    let (steps, memory) = plan(&args, &brambled, &board)?;
    println!("board: {} ({}), kernels {}", board.name, board.description, board.expected_kernels);
    println!("memory: {memory}");
    let mut changed = 0;
    let mut in_place = 0;
    if args.dry_run {
        println!("plan (dry run: nothing is written):");
    }
    for step in &steps {
        if step.is_done()? {
            in_place += 1;
            println!("  in place  {}", step.path().display());
            continue;
        }
        changed += 1;
        println!("  {}", step.describe());
        if !args.dry_run {
            step.apply()?;
        }
    }
    if args.dry_run {
        println!("dry run: {changed} steps to do, {in_place} already in place");
    } else {
        println!("flashed: {changed} steps done, {in_place} already in place");
        println!(
            "the board's console: {} at 115200 8N1 (GPIO 14 TXD, 15 RXD); HTTP {} and NDJSON {} on the board",
            board.uart_device, args.board.http, args.board.ndjson
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKWORM_CONFIG: &str = "# For more options and information see\n# http://rptl.io/configtxt\n\n\
        dtparam=audio=on\ncamera_auto_detect=1\ndtoverlay=vc4-kms-v3d\narm_64bit=1\n\n[cm4]\notg_mode=1\n\n[all]\n";

    #[test]
    fn config_txt_gets_the_uart_lines_under_all_once() {
        let lines = ["enable_uart=1", "dtoverlay=disable-bt"];
        let edited = edit_config_txt(BOOKWORM_CONFIG, &lines).unwrap();
        assert!(edited.starts_with(BOOKWORM_CONFIG), "the original lines stay as they were:\n{edited}");
        assert!(edited.ends_with("[all]\n\n# bramble flash: the PL011 UART on GPIO 14/15 for brambled's serial console\nenable_uart=1\ndtoverlay=disable-bt\n"), "{edited}");
        assert_eq!(edit_config_txt(&edited, &lines), None, "a second run changes nothing");
    }

    #[test]
    fn config_txt_after_another_section_opens_all_and_changes_a_conflicting_value() {
        let text = "enable_uart=0\n[pi4]\narm_boost=1\n";
        let edited = edit_config_txt(text, &["enable_uart=1", "dtoverlay=disable-bt"]).unwrap();
        assert_eq!(
            edited,
            "# bramble flash: was enable_uart=0\nenable_uart=1\n[pi4]\narm_boost=1\n\n[all]\n\
             # bramble flash: the PL011 UART on GPIO 14/15 for brambled's serial console\ndtoverlay=disable-bt\n"
        );
        assert_eq!(edit_config_txt(&edited, &["enable_uart=1", "dtoverlay=disable-bt"]), None);
        // A line only under a board filter does not count for [all].
        let edited = edit_config_txt("[pi5]\ndtoverlay=disable-bt\n", &["dtoverlay=disable-bt"]).unwrap();
        assert!(edited.ends_with("[all]\n# bramble flash: the PL011 UART on GPIO 14/15 for brambled's serial console\ndtoverlay=disable-bt\n"), "{edited}");
    }

    #[test]
    fn cmdline_loses_only_serial_consoles() {
        let text = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-udevd\n";
        let edited = edit_cmdline_txt(text).unwrap().unwrap();
        assert_eq!(
            edited,
            "console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-udevd\n"
        );
        assert_eq!(edit_cmdline_txt(&edited).unwrap(), None);
        assert_eq!(
            edit_cmdline_txt("console=ttyAMA0,115200 root=/dev/mmcblk0p2").unwrap().unwrap(),
            "root=/dev/mmcblk0p2\n"
        );
        assert!(edit_cmdline_txt("root=a\nquiet\n").unwrap_err().contains("2 non-empty lines"));
    }

    #[test]
    fn system_user_in_dialout_with_a_free_system_id() {
        let files = AccountFiles {
            passwd: "root:x:0:0:root:/root:/bin/bash\nsystemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n".to_string(),
            group: "root:x:0:\ndialout:x:20:pi\nsystemd-network:x:998:\nnetdev:x:999:pi\npi:x:1000:\n".to_string(),
            shadow: "root:*:19700:0:99999:7:::\npi:$y$j9T$hash:19700:0:99999:7:::\n".to_string(),
            gshadow: Some("root:*::\ndialout:*::pi\npi:!::\n".to_string()),
        };
        let with_user = add_system_user(&files, "brambled", "/var/lib/brambled", 20000).unwrap();
        assert!(with_user
            .passwd
            .ends_with("brambled:x:997:997:Bramble LLM daemon:/var/lib/brambled:/usr/sbin/nologin\n"));
        assert!(with_user.group.contains("\ndialout:x:20:pi,brambled\n"));
        assert!(with_user.group.ends_with("brambled:x:997:\n"));
        assert!(with_user.shadow.ends_with("brambled:!:20000::::::\n"));
        let gshadow = with_user.gshadow.as_deref().unwrap();
        assert!(gshadow.contains("\ndialout:*::pi,brambled\n") && gshadow.ends_with("brambled:!::\n"), "{gshadow}");
        // Idempotent: a second run changes nothing.
        assert_eq!(add_system_user(&with_user, "brambled", "/var/lib/brambled", 20001).unwrap(), with_user);
        // No dialout group: refused, naming it.
        let no_dialout = AccountFiles { group: "root:x:0:\n".to_string(), ..files };
        assert!(add_system_user(&no_dialout, "brambled", "/", 1).unwrap_err().contains("no dialout group"));
    }

    #[test]
    fn the_generated_config_loads_as_the_daemon_loads_it() {
        for name in ["pi4", "pi5", "pi-zero-2w"] {
            let board = profiles::profile(name, None).unwrap();
            let text = board_config(
                &board,
                "/var/lib/brambled/m.bramble",
                (2048, KvMode::Q4),
                "127.0.0.1:8080",
                "127.0.0.1:8081",
            );
            check_board_config(&text).unwrap();
            let config = bramble_board::config::Config::from_parts(
                Some((Path::new("brambled.toml"), &text)),
                &bramble_board::config::Overrides::default(),
            )
            .unwrap();
            assert_eq!(config.threads, board.cores);
            assert_eq!(config.uart.device.as_deref(), Some(Path::new(board.uart_device)));
            assert_eq!(config.model, Path::new("/var/lib/brambled/m.bramble"));
            assert_eq!((config.context, config.kv), (2048, KvMode::Q4));
        }
        let board = profiles::profile("pi4", None).unwrap();
        let exposed = board_config(&board, "/m", (2048, KvMode::F32), "0.0.0.0:8080", "127.0.0.1:8081");
        assert!(check_board_config(&exposed).unwrap_err().to_string().contains("auth_token"));
    }

    #[test]
    fn the_unit_uses_the_paths_flash_installs() {
        assert!(UNIT_TEXT.contains(&format!("ExecStart={} --config {}", board_paths::BINARY, board_paths::CONFIG)));
        assert!(UNIT_TEXT.contains(&format!("User={}", board_paths::USER)));
        assert!(UNIT_TEXT.contains("SupplementaryGroups=dialout"));
        assert!(UNIT_TEXT.contains(&format!("ReadOnlyPaths={} {}", board_paths::MODEL_DIR, board_paths::CONFIG)));
        assert!(UNIT_TEXT.contains("WantedBy=multi-user.target"));
    }
}
