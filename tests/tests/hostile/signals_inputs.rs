//! See the table in `main.rs`.

#[allow(unused_imports)]
use bramble_tests::daemon::*;

/// A FIFO as the model: opening it for reading blocks until a writer comes,
/// so `bramble` and `brambled` hung forever (and SIGTERM went unheard).
/// Anything but a regular file is refused before it is opened.
mod fifo_model {
    use bramble_tests::daemon::HANG;
    use bramble_tests::{bramble_binary, brambled_binary};
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// Runs `command` to its exit; a child still running after `limit` is killed and the test fails.
    fn run_bounded(command: &mut Command, limit: Duration) -> Output {
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "{command:?} still running after {limit:?} (blocked opening the FIFO?):\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

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
