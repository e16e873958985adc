#!/usr/bin/env bash
# Bramble's whole test suite, from a fresh Debian/Ubuntu machine:
#   1. installs what it needs (apt: qemu-user, the aarch64 cross compiler;
#      rustup: the aarch64 target; pip: numpy, gguf, tokenizers for the
#      independent reference), unless already present;
#      then checks formatting (rustfmt) and lints (clippy with warnings as
#      errors, host and aarch64; [workspace.lints] adds to clippy's defaults);
#   2. fetches the default model and The Tempest into ~/.cache/bramble;
#   3. runs every host test (unit, integration, end-to-end), and converts a
#      Llama-2-7B-shaped f16 GGUF checking the converter's peak RSS < 2 GiB
#      (all 32 blocks when the disk holds ~19 GB more, else as many 7B-sized
#      blocks as fit, at least 4; tests/convert-7b-rss.sh);
#   4. cross-builds the runtime's tests for aarch64 and runs them under qemu
#      as a Raspberry Pi 4 (cortex-a72) and a Raspberry Pi 5 (cortex-a76),
#      checks the emulated `bramble` generates the host's greedy tokens, and
#      runs the emulated `brambled` end to end (tests/daemon-aarch64.sh),
#      and flashes a fixture card whose installed `brambled` it then runs
#      (tests/flash-aarch64.sh).
#
#   scripts/test.sh              # everything
#   scripts/test.sh --host-only  # skip the aarch64 runs
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
host_only=false
[ "${1:-}" = "--host-only" ] && host_only=true

say() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

say "dependencies"
# The build and tests take about 5.7 GB under target/ (the 7B converter check
# then uses what is free, 4.3 GB at least); say what there is.
df -h "${CARGO_TARGET_DIR:-$root/target}" /tmp 2>/dev/null || df -h .
need_apt=()
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
# The real load balancers tests/tests/fleet.rs puts in front of three daemons.
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Cargo.toml's rust-version (1.89: the AVX-512 intrinsics) or newer.
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
[ "$rustc_minor" -ge 89 ] || rustup update stable
rustup target list --installed | grep -q aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
python3 -c "import numpy, gguf, tokenizers" 2>/dev/null || python3 -m pip install --quiet -r tests/reference/requirements.txt

say "format and lints (rustfmt; clippy -D warnings for the host and for aarch64)"
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy -p bramble-runtime --target aarch64-unknown-linux-gnu --all-targets --quiet -- -D warnings

say "default model and texts"
models/fetch-default.sh --images >/dev/null

log=$(mktemp)
trap 'rm -f "$log"' EXIT

say "host tests"
cargo test --workspace --quiet 2>&1 | tee -a "$log"

# On a small disk the host test build (about 3.8 GB) goes before the 7B
# converter check and the aarch64 builds need room; nothing below reads it.
host_build=${CARGO_TARGET_DIR:-$root/target}/debug
free_gib=$(df -Pk "$(dirname "$host_build")" | awk 'NR == 2 { print int($4 / 1024 / 1024) }')
if [ "$free_gib" -lt 16 ] && [ -d "$host_build" ]; then
    say "only $free_gib GiB free: removing the host test build ($host_build)"
    rm -rf "$host_build"
fi

say "converter memory: a Llama-2-7B-shaped f16 GGUF converts with peak RSS under 2 GiB"
tests/convert-7b-rss.sh --formats gguf

if ! $host_only; then
    for cpu in cortex-a72 cortex-a76; do
        say "aarch64 tests under qemu -cpu $cpu"
        QEMU_CPU=$cpu cargo test --quiet --target aarch64-unknown-linux-gnu -p bramble-runtime 2>&1 | tee -a "$log"
    done
    say "the aarch64 binary under qemu generates the host's greedy tokens (real model)"
    tests/emulated-greedy.sh 2>&1 | tee -a "$log"
    # --- brambled on aarch64: its `N passed, M failed` line counts in the summary below.
    say "the aarch64 brambled under qemu serves an NDJSON and an HTTP request and exits 0 on SIGTERM"
    tests/daemon-aarch64.sh 2>&1 | tee -a "$log"
    # --- end brambled on aarch64
    # --- flash: its `N passed, M failed` line counts in the summary below.
    say "bramble flash onto a fixture card; the installed aarch64 brambled under qemu serves its installed config and model"
    tests/flash-aarch64.sh 2>&1 | tee -a "$log"
    # --- end flash
fi
say "all tests passed"
# One closing line over every cargo test run above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /passed, [0-9]+ failed$/ && !/^test result/ { p += $(NF-3); f += $(NF-1) }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
