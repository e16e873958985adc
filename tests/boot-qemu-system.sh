#!/usr/bin/env bash
# Optional, NOT run by scripts/test.sh or CI: a whole Debian 12 arm64 system
# boots under qemu-system-aarch64 (cortex-a72, 4 cores, 2 GiB: a Pi 4's CPU),
# and `bramble deploy` installs brambled into it over real ssh: the probe, the
# upload, the root script (useradd, install, systemctl enable/restart) on a
# real systemd with the unit's hardening, and /health. tests/tests/flash.rs
# checks deploy against a stand-in ssh that records the root script without
# running it; this script runs it. A second deploy (the update path) must
# leave the board healthy too. Prints `N passed, M failed`.
#
#   tests/boot-qemu-system.sh
#
# Needs: apt-get install qemu-system-arm qemu-efi-aarch64 qemu-utils cloud-image-utils openssh-client,
# the cross toolchain of README.md, and network access to cloud.debian.org
# for the Debian "genericcloud" arm64 image (about 400 MB, kept in
# $BRAMBLE_CACHE, checked against Debian's SHA512SUMS). Takes 5 to 20 minutes:
# qemu emulates every instruction of the boot.
#
# The image is Debian's, not Raspberry Pi OS (which has no qemu machine): it
# has no config.txt, so deploy leaves the UART settings alone (it says so),
# and no /dev/serial0, so the daemon's console waits for a device that never
# appears while TCP serves. Status: written with the rest of the deployment work on a
# machine without access to cloud.debian.org, so it has not been run yet.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
triple=aarch64-unknown-linux-gnu
cache=${BRAMBLE_CACHE:-$HOME/.cache/bramble}
images=https://cloud.debian.org/images/cloud/bookworm/latest
image_name=debian-12-genericcloud-arm64.qcow2
firmware=/usr/share/qemu-efi-aarch64/QEMU_EFI.fd
boot_timeout=1200

for tool in qemu-system-aarch64 qemu-img cloud-localds ssh scp ssh-keygen curl; do
    command -v $tool >/dev/null || { echo "$tool is missing (see the header of $0)" >&2; exit 2; }
done
[ -f $firmware ] || { echo "$firmware is missing: apt-get install qemu-efi-aarch64" >&2; exit 2; }

cargo build --quiet --release -p bramble-tools --bin bramble
cargo build --quiet --release --target $triple -p bramble-board --bin brambled
bramble=$target/release/bramble
brambled=$target/$triple/release/brambled

mkdir -p "$cache"
if [ ! -f "$cache/$image_name" ]; then
    curl -fL --retry 3 -o "$cache/$image_name.part" "$images/$image_name"
    mv "$cache/$image_name.part" "$cache/$image_name"
fi
(cd "$cache" && curl -fsSL "$images/SHA512SUMS" | grep " $image_name\$" | sha512sum -c --quiet -) \
    || { echo "$cache/$image_name does not match Debian's SHA512SUMS; delete it and run again" >&2; exit 2; }

work=$(mktemp -d)
qemu_pid=
cleanup() {
    # Only the virtual machine this script started, by its id.
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
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

# The disk: a copy-on-write layer over the cached image. The seed: a user `pi`
# with this run's key and passwordless sudo, as Raspberry Pi Imager sets one up.
qemu-img create -q -f qcow2 -b "$cache/$image_name" -F qcow2 "$work/disk.qcow2" 8G
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
cat >"$work/user-data" <<EOF
#cloud-config
users:
  - name: pi
    groups: [sudo]
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    shell: /bin/bash
    ssh_authorized_keys:
      - $(cat "$work/key.pub")
EOF
printf 'instance-id: bramble-deploy-test\nlocal-hostname: raspberrypi\n' >"$work/meta-data"
cloud-localds "$work/seed.img" "$work/user-data" "$work/meta-data"

# ssh on a free loopback port of this machine.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 4 -m 2048 -bios $firmware \
    -drive if=virtio,format=qcow2,file="$work/disk.qcow2" -drive if=virtio,format=raw,file="$work/seed.img" \
    -netdev user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22 -device virtio-net-pci,netdev=net0 \
    -display none -serial file:"$work/console.log" &
qemu_pid=$!

# deploy's --ssh and --scp: the system's, pointed at the forwarded port with this run's key.
options="-i $work/key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10"
printf '#!/bin/sh\nexec ssh -p %s %s "$@"\n' "$port" "$options" >"$work/ssh"
printf '#!/bin/sh\nexec scp -P %s %s "$@"\n' "$port" "$options" >"$work/scp"
chmod +x "$work/ssh" "$work/scp"
on_board() { "$work/ssh" -o BatchMode=yes pi@127.0.0.1 "$@"; }

echo "== booting Debian 12 arm64 under qemu-system-aarch64 (console: $work/console.log)"
waited=0
until on_board true 2>/dev/null; do
    if ! kill -0 "$qemu_pid" 2>/dev/null || [ $waited -ge $boot_timeout ]; then
        check "the system boots and takes ssh" 1 "$(tail -n 30 "$work/console.log")"
        echo "deploy to a booted arm64 system: $passed passed, $failed failed"
        exit 1
    fi
    sleep 5
    waited=$((waited + 5))
done
check "the system boots and takes ssh (after ${waited} s)" 0
on_board 'command -v curl >/dev/null' || check "curl on the board" 1 "the image has no curl; deploy's health check needs it"

"$bramble" synth --format gguf --tokenizer bpe --dim 64 --layers 2 --seed 5 --output "$work/tiny.gguf" >/dev/null
"$bramble" convert --input "$work/tiny.gguf" --output "$work/tiny.bramble" --quant q8 >/dev/null

deploy() {
    "$bramble" deploy --host pi@127.0.0.1 --model "$work/tiny.bramble" --brambled "$brambled" \
        --profile pi4 --memory 2G --ssh "$work/ssh" --scp "$work/scp" --health-timeout 600 2>&1
}
if out=$(deploy) && grep -q "brambled is healthy" <<<"$out"; then
    check "bramble deploy: installed, restarted, /health answers" 0
else
    check "bramble deploy" 1 "$out"
fi
if [ "$(on_board systemctl is-enabled brambled.service 2>&1)" = enabled ] \
    && on_board id brambled | grep -q dialout && on_board test -x /usr/local/bin/brambled; then
    check "the unit is enabled, the user brambled is in dialout, the binary is in place" 0
else
    check "unit enabled, user in dialout" 1 "$(on_board 'systemctl status brambled; id brambled' 2>&1)"
fi
answer=$(on_board "curl -fsS --max-time 600 http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \
    -d '{\"prompt\":\"Hello\",\"max_tokens\":3,\"temperature\":0}'" 2>&1) || true
if grep -q '"completion_tokens"' <<<"$answer"; then
    check "a completion over the board's loopback HTTP" 0
else
    check "a completion over the board's loopback HTTP" 1 "$answer"
fi
# The update path: the same command again.
if out=$(deploy) && grep -q "brambled is healthy" <<<"$out"; then
    check "a second deploy (the update) is healthy too" 0
else
    check "a second deploy" 1 "$out"
fi

on_board sudo poweroff >/dev/null 2>&1 || true
waited=0
while kill -0 "$qemu_pid" 2>/dev/null && [ $waited -lt 120 ]; do
    sleep 1
    waited=$((waited + 1))
done
echo "deploy to a booted arm64 system: $passed passed, $failed failed"
[ $failed = 0 ]
