//! Signals and odd inputs at start: SIGHUP used to kill the daemon without a
//! drain; SIGTERM was ignored while the model was being opened (a FIFO as
//! `--model` blocked forever); `--config /dev/zero` was read without bound.

use bramble_tests::daemon::*;
use bramble_tests::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn sighup_is_ignored_and_the_daemon_serves_on() {
    let mut daemon = Daemon::start(&[]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid()), nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.assert_alive();
    let lines = ndjson(daemon.ndjson(), &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(lines.last().unwrap()["eval_count"], 2, "{lines:?}");
    assert!(daemon.log().contains("SIGHUP: ignored"), "{}", daemon.log());
    assert!(daemon.terminate().success());
}

#[test]
fn a_device_as_the_config_file_is_refused_at_once() {
    for device in ["/dev/zero", "/dev/urandom"] {
        let mut child = Command::new(brambled_binary())
            .args(["--uart", "none", "--config", device, "--model"])
            .arg(model())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status =
            exit_within(&mut child, Duration::from_secs(10)).unwrap_or_else(|| panic!("{device}: still reading"));
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{device}: {stderr}");
        assert!(stderr.contains(device) && stderr.contains("not a regular file"), "{device}: {stderr}");
    }
    // A regular file over the cap is refused too, by its size.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let output = Command::new(brambled_binary()).args(["--uart", "none", "--config"]).arg(&big).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bytes"), "{stderr}");
}

#[test]
fn sigterm_while_the_model_is_being_opened_ends_the_process() {
    // Opening a FIFO blocks until a writer comes: the daemon is stuck in its load.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.bramble");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut child = Command::new(brambled_binary())
        .args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "127.0.0.1:0", "--model"])
        .arg(&fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = exit_within(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{stderr}"));
    // Stopped by the signal while loading, or refused the FIFO before it came: either way, promptly and cleanly.
    assert!(status.code().is_some(), "killed by a signal: {status}\n{stderr}");
}

/// A FIFO as the model: opening it for reading blocks until a writer comes,
/// so `bramble` and `brambled` hung forever (and SIGTERM went unheard).
/// Anything but a regular file is refused before it is opened.
mod fifo_model {
    use bramble_tests::daemon::{run_bounded, HANG};
    use bramble_tests::{bramble_binary, brambled_binary};
    use std::process::{Command, Output};
    use std::time::Duration;

    /// An error exit (not a signal) naming the path and saying what it is.
    fn assert_refused(what: &str, output: &Output, path: &str, kind: &str) {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            matches!(output.status.code(), Some(code) if code != 0),
            "{what}: expected an error exit, got {}:\n{stderr}",
            output.status
        );
        assert!(
            stderr.contains(path) && stderr.contains(kind),
            "{what}: the error names {path} and {kind:?}:\n{stderr}"
        );
    }

    /// Long enough for a loaded machine to start the binaries, far below a hang.
    const PROMPT: Duration = Duration::from_secs(20);

    #[test]
    fn a_fifo_as_the_model_is_refused_at_once() {
        let directory = tempfile::tempdir().unwrap();
        let fifo = directory.path().join("model.bramble");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
        let path = fifo.to_str().unwrap();
        assert!(PROMPT < HANG);

        let output = run_bounded(Command::new(bramble_binary()).args(["inspect", path]), PROMPT);
        assert_refused("bramble inspect", &output, path, "FIFO");
        let output = run_bounded(
            Command::new(bramble_binary()).args(["generate", "--model", path, "--prompt", "Hi", "--max-tokens", "1"]),
            PROMPT,
        );
        assert_refused("bramble generate", &output, path, "FIFO");
        let output = run_bounded(
            Command::new(brambled_binary())
                .args(["--uart", "none", "--http", "127.0.0.1:0", "--ndjson", "none", "--threads", "1", "--model"])
                .arg(&fifo),
            PROMPT,
        );
        assert_refused("brambled", &output, path, "FIFO");
    }

    #[test]
    fn a_directory_as_the_model_is_refused_naming_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().to_str().unwrap();
        let output = run_bounded(Command::new(bramble_binary()).args(["inspect", path]), PROMPT);
        assert_refused("bramble inspect", &output, path, "directory");
    }
}
