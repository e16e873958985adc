#!/usr/bin/env bash
# Optional, NOT run by scripts/test.sh or CI: a whole Debian 12 arm64 system
# boots under qemu-system-aarch64 (cortex-a72, 4 cores, 2 GiB: a Pi 4's CPU),
# and `bramble deploy` installs brambled into it over real ssh: the probe, the
# upload, the root script (useradd, install, systemctl enable/restart) on a
# real systemd with the unit's hardening, /health, a completion, the console
# on the UART, a second deploy (the update path: HTTP moved off loopback with
# a token, /health and a completion through the forwarded port) and a reboot
# that brings the daemon back. tests/tests/flash.rs checks deploy against a
# stand-in ssh that records the root script without running it; this script
# runs it. Prints `N passed, M failed`.
#
#   sudo tests/boot-qemu-system.sh                                # as root: debootstrap, chroot
#   sudo BOARD_VM_DIR=/work/board-vm tests/boot-qemu-system.sh    # keeps the disk, the console log, the logs
#
# Needs: root, apt-get install --no-install-recommends debootstrap qemu-system-arm
# e2fsprogs openssh-client curl python3, the cross toolchain of README.md,
# and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org). No cloud
# image, no UEFI firmware, no loop devices: the system is debootstrapped
# from Debian's own packages, its second stage run in a chroot through
# binfmt_misc (the script registers qemu-aarch64-static with the F flag
# when the chroot cannot run aarch64 programs, taking it from
# qemu-user-static with `apt-get download` if it is not installed, and
# removes the registration at exit), packed into an ext4 disk with
# `mkfs.ext4 -d`, and booted with -kernel/-initrd. The finished system is
# cached as a tar in $BRAMBLE_CACHE/board-vm (about 700 MB), so only the
# first run debootstraps.
#
# Takes: first run 11 minutes (the download and first stage 25 s, the
# emulated second stage about 8 minutes: with Debian's default initramfs,
# 35 MB and built twice, it took 24; the virtio-only one configured below
# builds in 34 s), later runs 4 to 6 minutes (boot to ssh 40 to 60 s, each
# deploy 30 to 50 s, the reboot 50 to 70 s), on a 2-core host busy with
# other builds.
#
# The system is Debian's, not Raspberry Pi OS (which has no qemu machine):
# it has no config.txt, so deploy leaves the UART settings alone (it says
# so). Its PL011 is ttyAMA0, as on a Pi 4 with disable-bt, and a udev rule
# names it /dev/serial0 as Raspberry Pi OS does, so the daemon's console
# runs on it; qemu puts it on a loopback TCP socket (and logs it), and the
# kernel's console shares it.
#
# Status: run on 2026-12-05, 10 passed, 0 failed, once uncached and once
# cached (the figures are in docs/flash.md, "An emulated board").
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
triple=aarch64-unknown-linux-gnu
cache=${BRAMBLE_CACHE:-$HOME/.cache/bramble}/board-vm
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cpus=${BOARD_VM_CPUS:-4}
boot_timeout=1200
base=$cache/debian-$suite-arm64.tar
packages=systemd,systemd-sysv,udev,dbus,openssh-server,sudo,linux-image-arm64,iproute2,ca-certificates,curl,kmod,procps,netbase

[ "$(id -u)" = 0 ] || { echo "$0 needs root (debootstrap, chroot, mkfs.ext4 -d keeping the owners)" >&2; exit 2; }
for tool in debootstrap qemu-system-aarch64 mkfs.ext4 ssh scp ssh-keygen curl python3; do
    command -v $tool >/dev/null || { echo "$tool is missing (see the header of $0)" >&2; exit 2; }
done

cargo build --quiet --release -p bramble-tools --bin bramble
cargo build --quiet --release --target $triple -p bramble-board --bin brambled
bramble=$target/release/bramble
brambled=$target/$triple/release/brambled

if [ -n "${BOARD_VM_DIR:-}" ]; then
    work=$BOARD_VM_DIR
    keep=1
    mkdir -p "$work"
else
    work=$(mktemp -d)
    keep=
fi
work=$(cd "$work" && pwd)
qemu_pid=
binfmt_entry=
mounted_binfmt=
cleanup() {
    # Only the virtual machine this script started, by its id; only the binfmt entry it registered.
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
    [ -n "$binfmt_entry" ] && [ -e "$binfmt_entry" ] && echo -1 >"$binfmt_entry" || true
    [ -n "$mounted_binfmt" ] && umount /proc/sys/fs/binfmt_misc 2>/dev/null || true
    [ -z "$keep" ] && rm -rf "$work" || rm -rf "$work/rootfs" "$work/base"
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
summary() { echo "deploy to a booted arm64 system: $passed passed, $failed failed"; }

# Lets the chroot ROOTFS run its aarch64 programs: a binfmt_misc entry whose
# interpreter is static and opened at registration (F), so it works inside.
aarch64_in_chroot() {
    chroot "$1" /bin/true 2>/dev/null && return 0
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        mounted_binfmt=1
    fi
    local qemu
    qemu=$(command -v qemu-aarch64-static || true)
    if [ -z "$qemu" ]; then
        qemu=$cache/qemu-aarch64-static
        if [ ! -x "$qemu" ]; then
            (cd "$work" && apt-get download -q qemu-user-static)
            dpkg-deb -x "$work"/qemu-user-static_*.deb "$work/qemu-user-static"
            cp "$work/qemu-user-static/usr/bin/qemu-aarch64-static" "$qemu"
        fi
    fi
    local magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":bramble-aarch64:M::$magic:$mask:$qemu:OCF" >/proc/sys/fs/binfmt_misc/register
    binfmt_entry=/proc/sys/fs/binfmt_misc/bramble-aarch64
    chroot "$1" /bin/true || { echo "the chroot cannot run aarch64 programs even through $qemu" >&2; exit 2; }
}

# The system, made once and cached: Debian's packages, a user `pi` with
# passwordless sudo (as Raspberry Pi Imager sets one up; its key is added
# per run), DHCP on the virtio NIC, sshd, /dev/serial0.
if [ ! -f "$base" ]; then
    mkdir -p "$cache"
    rootfs=$work/base
    rm -rf "$rootfs"
    started=$(date +%s)
    echo "== debootstrap $suite arm64 from $mirror into $rootfs (log: $work/debootstrap.log)"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=$packages $suite "$rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; exit 2; }
    # The board boots from virtio only: a small initramfs, quick to build under emulation
    # (initramfs-tools itself is unpacked by the second stage).
    mkdir -p "$rootfs/etc/initramfs-tools/conf.d" "$rootfs/etc/initramfs-tools/hooks"
    printf 'MODULES=list\n' >"$rootfs/etc/initramfs-tools/conf.d/board-vm"
    cat >"$rootfs/etc/initramfs-tools/hooks/board-vm" <<'EOF'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for module in virtio_pci virtio_blk ext4; do force_load $module; done
EOF
    chmod 755 "$rootfs/etc/initramfs-tools/hooks/board-vm"
    aarch64_in_chroot "$rootfs"
    echo "== the second stage, emulated (minutes)"
    chroot "$rootfs" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; exit 2; }
    echo raspberrypi >"$rootfs/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
    printf '/dev/vda\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' >"$rootfs/etc/fstab"
    echo 'nameserver 10.0.2.3' >"$rootfs/etc/resolv.conf"
    printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$rootfs/etc/systemd/network/10-wired.network"
    # Raspberry Pi OS names the GPIO 14/15 UART /dev/serial0; here the PL011 is that UART.
    echo 'KERNEL=="ttyAMA0", SYMLINK+="serial0", GROUP="dialout", MODE="0660"' >"$rootfs/etc/udev/rules.d/99-serial0.rules"
    chroot "$rootfs" systemctl enable --quiet systemd-networkd.service
    chroot "$rootfs" useradd --create-home --shell /bin/bash --groups sudo pi
    echo 'pi ALL=(ALL) NOPASSWD: ALL' >"$rootfs/etc/sudoers.d/010_pi-nopasswd"
    chmod 440 "$rootfs/etc/sudoers.d/010_pi-nopasswd"
    rm -f "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/boot/*.dpkg-bak
    tar -C "$rootfs" --numeric-owner -cf "$base.part" . && mv "$base.part" "$base"
    rm -rf "$rootfs"
    echo "== the system is cached in $base (debootstrap took $(($(date +%s) - started)) s)"
fi

# This run's disk: the cached system, this run's key for pi, packed into ext4.
rootfs=$work/rootfs
rm -rf "$rootfs" "$work/key" "$work/key.pub"
mkdir -p "$rootfs"
tar -C "$rootfs" -xf "$base"
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
pi_ids=$(awk -F: '$1 == "pi" { print $3 ":" $4 }' "$rootfs/etc/passwd")
install -d -m 0700 -o "${pi_ids%:*}" -g "${pi_ids#*:}" "$rootfs/home/pi/.ssh"
install -m 0600 -o "${pi_ids%:*}" -g "${pi_ids#*:}" "$work/key.pub" "$rootfs/home/pi/.ssh/authorized_keys"
cp "$rootfs"/boot/vmlinuz-* "$work/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$work/initrd.img"
rm -f "$work/disk.raw"
mkfs.ext4 -q -F -L root -d "$rootfs" "$work/disk.raw" 4G >/dev/null
rm -rf "$rootfs"

# ssh, the HTTP port 8077 and the UART on free loopback ports of this machine.
read -r port http_port uart_port < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(3)]
for s in sockets: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))')
rm -f "$work/console.log"
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp "$cpus" -m 2048 \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" -append 'root=/dev/vda rw console=ttyAMA0' \
    -drive if=virtio,format=raw,file="$work/disk.raw" \
    -netdev user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22,hostfwd=tcp:127.0.0.1:$http_port-:8077 \
    -device virtio-net-pci,netdev=net0,romfile= \
    -chardev socket,id=uart,host=127.0.0.1,port=$uart_port,server=on,wait=off,logfile="$work/console.log" \
    -serial chardev:uart -display none -monitor none >"$work/qemu.log" 2>&1 &
qemu_pid=$!

# deploy's --ssh and --scp: the system's, pointed at the forwarded port with this run's key.
options="-i $work/key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3"
printf '#!/bin/sh\nexec ssh -p %s %s "$@"\n' "$port" "$options" >"$work/ssh"
printf '#!/bin/sh\nexec scp -P %s %s "$@"\n' "$port" "$options" >"$work/scp"
chmod +x "$work/ssh" "$work/scp"
on_board() { "$work/ssh" -o BatchMode=yes pi@127.0.0.1 "$@"; }
wait_for_ssh() { # waits until ssh answers on a boot other than $1; prints the seconds since the call
    local started
    started=$(date +%s)
    until [ "$(on_board cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo none)" != "$1" ] && on_board true 2>/dev/null; do
        if ! kill -0 "$qemu_pid" 2>/dev/null || [ $(($(date +%s) - started)) -ge $boot_timeout ]; then
            return 1
        fi
        sleep 3
    done
    echo $(($(date +%s) - started))
}

echo "== booting Debian 12 arm64 under qemu-system-aarch64, $cpus cores (console: $work/console.log)"
if ! waited=$(wait_for_ssh none); then
    check "the system boots and takes ssh" 1 "$(tail -n 30 "$work/console.log"; cat "$work/qemu.log")"
    summary
    exit 1
fi
check "the system boots and takes ssh (after ${waited} s)" 0
on_board 'command -v curl >/dev/null' || check "curl on the board" 1 "the system has no curl; deploy's health check needs it"

"$bramble" synth --format gguf --tokenizer bpe --dim 64 --layers 2 --seed 5 --output "$work/tiny.gguf" >/dev/null
"$bramble" convert --input "$work/tiny.gguf" --output "$work/tiny.bramble" --quant q8 >/dev/null

deploy() {
    "$bramble" deploy --host pi@127.0.0.1 --model "$work/tiny.bramble" --brambled "$brambled" \
        --profile pi4 --memory 2G --ssh "$work/ssh" --scp "$work/scp" --health-timeout 600 "$@" 2>&1
}
started=$(date +%s)
if out=$(deploy) && grep -q "brambled is healthy" <<<"$out"; then
    check "bramble deploy: installed, restarted, /health answers ($(($(date +%s) - started)) s)" 0
else
    check "bramble deploy" 1 "$out"
fi
echo "$out" >"$work/deploy-1.log"
state=$(on_board 'systemctl is-enabled brambled; systemctl is-active brambled; systemctl show -p StatusText --value brambled;
    ps -o user= -C brambled; id -nG brambled; test -x /usr/local/bin/brambled && echo installed' 2>&1 | tr '\n' ' ')
if [ "$state" = "enabled active serving brambled brambled dialout installed " ]; then
    check "the unit is enabled and active (sd_notify: serving), runs as brambled in dialout" 0
else
    check "unit enabled, active, user brambled in dialout" 1 "$state; $(on_board 'sudo systemctl status brambled' 2>&1)"
fi
journal=$(on_board sudo journalctl -b -u brambled --no-pager 2>&1)
if grep -q 'brambled: info: ready' <<<"$journal" && ! grep -q 'brambled: error' <<<"$journal"; then
    check "the journal: loaded, ready, no error" 0
else
    check "the journal" 1 "$journal"
fi
answer=$(on_board "curl -fsS --max-time 600 http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \
    -d '{\"prompt\":\"Hello\",\"max_tokens\":3,\"temperature\":0}'" 2>&1) || true
if grep -q '"completion_tokens":3' <<<"$answer"; then
    check "a completion over the board's loopback HTTP" 0
else
    check "a completion over the board's loopback HTTP" 1 "$answer"
fi

# The console on the UART: /dev/serial0 → ttyAMA0, opened under DevicePolicy=closed and DeviceAllow=char-ttyAMA.
uart=$(python3 - "$uart_port" <<'EOF' 2>&1
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
end = time.time() + 120
data = b""
while time.time() < end and b"conversation:" not in data:
    s.sendall(b"/stats\r")
    stop = time.time() + 10
    while time.time() < stop and b"conversation:" not in data:
        try:
            data += s.recv(4096)
        except socket.timeout:
            pass
print(data.decode("utf-8", "replace"))
EOF
) || true
if grep -q 'model tiny' <<<"$uart" && grep -q 'conversation:' <<<"$uart"; then
    check "the console on the UART (/dev/serial0) answers /stats" 0
else
    check "the console on the UART" 1 "$uart; $(on_board 'ls -l /dev/serial0; sudo journalctl -u brambled | grep console' 2>&1)"
fi

# The update path: HTTP moved off loopback, which needs a token.
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$work/token"
started=$(date +%s)
if out=$(deploy --http 0.0.0.0:8077 --auth-token-file "$work/token") && grep -q "brambled is healthy" <<<"$out" \
    && on_board test -e /etc/brambled.toml.bramble-bak; then
    check "a second deploy (the update: HTTP on 0.0.0.0:8077, a token) is healthy, the first config kept ($(($(date +%s) - started)) s)" 0
else
    check "a second deploy" 1 "$out"
fi
echo "$out" >"$work/deploy-2.log"
if grep -q '"status":"ok"' <<<"$(curl -fsS --max-time 30 "http://127.0.0.1:$http_port/health" 2>&1)"; then
    check "/health through the forwarded port" 0
else
    check "/health through the forwarded port" 1
fi
request=(-sS --max-time 600 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/v1/completions"
    -H 'Content-Type: application/json' -d '{"prompt":"Hello","max_tokens":3,"temperature":0}')
without=$(curl "${request[@]}" 2>&1) || true
with=$(curl "${request[@]}" -H "Authorization: Bearer $(cat "$work/token")" 2>&1) || true
if [ "$without" = 401 ] && [ "$with" = 200 ]; then
    check "a completion through the forwarded port: 401 without the token, 200 with it" 0
else
    check "a completion through the forwarded port" 1 "without the token $without, with it $with"
fi

# A reboot: the unit is enabled, so the daemon serves again.
boot_id=$(on_board cat /proc/sys/kernel/random/boot_id)
# (The session may never see its end: the guest vanishes under qemu's user network without a FIN.)
timeout 30 "$work/ssh" -o BatchMode=yes pi@127.0.0.1 sudo systemctl reboot >/dev/null 2>&1 || true
started=$(date +%s)
healthy=
if wait_for_ssh "$boot_id" >/dev/null; then
    while [ $(($(date +%s) - started)) -lt 600 ]; do
        if grep -q '"status":"ok"' <<<"$(curl -fsS --max-time 5 "http://127.0.0.1:$http_port/health" 2>&1)"; then
            healthy=1
            break
        fi
        sleep 2
    done
fi
if [ -n "$healthy" ]; then
    check "after a reboot brambled serves /health again ($(($(date +%s) - started)) s)" 0
else
    check "after a reboot" 1 "$(tail -n 30 "$work/console.log")"
fi

timeout 30 "$work/ssh" -o BatchMode=yes pi@127.0.0.1 sudo systemctl poweroff >/dev/null 2>&1 || true
waited=0
while kill -0 "$qemu_pid" 2>/dev/null && [ $waited -lt 120 ]; do
    sleep 1
    waited=$((waited + 1))
done
summary
[ $failed = 0 ]
