# Sourced by tests/daemon-aarch64.sh and tests/flash-aarch64.sh (from the
# repository root): the cross-built binaries, a work directory cleaned up on
# exit with the daemon it started, the `check` tally, and the steps of
# running `brambled` under qemu.
target=${CARGO_TARGET_DIR:-target}
triple=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
# Generous: qemu emulates every instruction, on a machine that may be busy.
ready_timeout=120
request_timeout=120

cargo build --quiet --release -p bramble-tools --bin bramble
cargo build --quiet --release --target $triple -p bramble-board --bin brambled
bramble=$target/release/bramble
brambled=$target/$triple/release/brambled

work=$(mktemp -d)
daemon_pid=
cleanup() {
    # Only the daemon this script started, by its id.
    [ -n "$daemon_pid" ] && kill -KILL "$daemon_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
check() { # NAME STATUS [DETAIL]
    if [ "$2" = 0 ]; then
        passed=$((passed + 1))
        echo "ok:     $1"
    else
        failed=$((failed + 1))
        echo "FAILED: $1${3:+: $3}" >&2
    fi
}

# A tiny model with a byte-level BPE vocabulary (the daemon tests' kind), as $work/tiny.bramble.
tiny_model() {
    "$bramble" synth --format gguf --tokenizer bpe --dim 64 --layers 2 --seed 5 --output "$work/tiny.gguf" >/dev/null
    "$bramble" convert --input "$work/tiny.gguf" --output "$work/tiny.bramble" --quant q8 >/dev/null
}

# The address a listener of the daemon logged, or nothing yet.
listening() { sed -n "s/^brambled: info: $1 listening on //p" "$work/log" | head -n 1; }

# Waits for the daemon ($daemon_pid, logging to $work/log) to log that it is
# ready, to exit, or for the timeout.
wait_ready() {
    local waited=0
    until grep -q '^brambled: info: ready' "$work/log"; do
        if ! kill -0 "$daemon_pid" 2>/dev/null || [ $waited -ge $((ready_timeout * 10)) ]; then
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# Sends the daemon SIGTERM and waits for it to exit, or for the timeout
# (qemu-user passes the signal to the guest and its exit status back).
terminate() {
    kill -TERM "$daemon_pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$daemon_pid" 2>/dev/null && [ $waited -lt $((ready_timeout * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
}
