#!/usr/bin/env bash
# `bramble flash` with the cross-built aarch64 `brambled` onto a copy of the
# fixture card (tests/fixtures/rpi-os), then the installed binary, run under
# qemu as a Pi 4 (cortex-a72) against the installed config and model, starts
# with the config's settings, answers an NDJSON request and `GET /health` over
# TCP, and exits 0 on SIGTERM. Prints `N passed, M failed` (scripts/test.sh
# adds it to its summary); exits non-zero if anything failed.
#
#   tests/flash-aarch64.sh
#
# The installed config names board paths (/var/lib/brambled/..., /dev/serial0,
# fixed ports); on this machine the flags point the daemon at the model inside
# the card copy, turn the UART off and bind port 0 on loopback (the ports are
# read from the daemon's log). Every other key comes from the installed config.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/aarch64-common.sh

cp -r tests/fixtures/rpi-os "$work/card"
boot=$work/card/boot
rootfs=$work/card/rootfs
tiny_model

# Flash: the installed binary is the cross-built one, executable.
if out=$("$bramble" flash --boot "$boot" --rootfs "$rootfs" --model "$work/tiny.bramble" --brambled "$brambled" \
    --profile pi4 2>&1); then
    check "flash with the aarch64 brambled" 0
else
    check "flash with the aarch64 brambled" 1 "$out"
fi
installed=$rootfs/usr/local/bin/brambled
if cmp -s "$brambled" "$installed" && [ -x "$installed" ] && [ "$(stat -c %a "$installed")" = 755 ]; then
    check "installed /usr/local/bin/brambled is the aarch64 build, mode 0755" 0
else
    check "installed /usr/local/bin/brambled is the aarch64 build, mode 0755" 1 "$(ls -l "$installed" 2>&1)"
fi
# A second flash changes nothing.
if out=$("$bramble" flash --boot "$boot" --rootfs "$rootfs" --model "$work/tiny.bramble" --brambled "$brambled" \
    --profile pi4 2>&1) && grep -q "flashed: 0 steps done" <<<"$out"; then
    check "a second flash changes nothing" 0
else
    check "a second flash changes nothing" 1 "$out"
fi

echo "== the installed brambled under qemu -cpu cortex-a72, with the installed config"
: >"$work/log"
QEMU_CPU=cortex-a72 qemu-aarch64 -L $sysroot "$installed" --config "$rootfs/etc/brambled.toml" \
    --model "$rootfs/var/lib/brambled/tiny.bramble" --uart none --http 127.0.0.1:0 --ndjson 127.0.0.1:0 \
    2>"$work/log" &
daemon_pid=$!
wait_ready
ndjson=$(listening ndjson)
http=$(listening http)
# threads = 4 (the profile's cores) and context = 2048, capped at the model's 128, come from the installed config.
if grep -q '^brambled: info: ready' "$work/log" && grep -q '4 threads, context 128' "$work/log" \
    && [ -n "$ndjson" ] && [ -n "$http" ]; then
    check "ready with the installed config (4 threads, context 128), ndjson on $ndjson, http on $http" 0
else
    check "ready with the installed config" 1 "$(cat "$work/log")"
fi

if [ -n "$ndjson" ] && detail=$(python3 - "$ndjson" "$request_timeout" 2>&1 <<'EOF'
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=float(sys.argv[2])) as s:
    s.sendall(json.dumps({"prompt": "Hello world", "max_tokens": 4, "temperature": 0}).encode() + b"\n")
    lines = []
    with s.makefile("rb") as reader:
        for raw in reader:
            line = json.loads(raw)
            lines.append(line)
            if line.get("done"):
                break
last = lines[-1]
if not last.get("done") or "error" in last or last.get("model") not in (None, "tiny"):
    sys.exit(f"not a done line: {lines}")
if not isinstance(last.get("eval_count"), int) or not 0 < last["eval_count"] <= 4:
    sys.exit(f"eval_count {last.get('eval_count')!r} in {lines}")
print(f"ndjson: {last['eval_count']} tokens generated ({last.get('done_reason')})")
EOF
); then
    check "$detail" 0
else
    check "one NDJSON request" 1 "${detail:-no listener}"
fi

if [ -n "$http" ] && detail=$(python3 - "$http" "$request_timeout" 2>&1 <<'EOF'
import http.client, json, sys
host, port = sys.argv[1].rsplit(":", 1)
connection = http.client.HTTPConnection(host, int(port), timeout=float(sys.argv[2]))
connection.request("GET", "/health")
response = connection.getresponse()
health = json.loads(response.read())
if response.status != 200 or health.get("status") != "ok" or health.get("model") != "tiny" or health.get("served") != 1:
    sys.exit(f"status {response.status}: {health}")
print(f"http: /health ok, model {health['model']}, context {health['context']}, served {health['served']}")
EOF
); then
    check "$detail" 0
else
    check "GET /health" 1 "${detail:-no listener}"
fi

terminate
status=0
if kill -0 "$daemon_pid" 2>/dev/null; then
    check "exits on SIGTERM" 1 "still running after ${ready_timeout} s"
else
    wait "$daemon_pid" || status=$?
    check "exits 0 on SIGTERM" "$status" "exit status $status; log: $(cat "$work/log")"
fi
daemon_pid=

echo "flash + installed aarch64 brambled: $passed passed, $failed failed"
[ $failed = 0 ]
