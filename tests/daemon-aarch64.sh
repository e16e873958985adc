#!/usr/bin/env bash
# The aarch64 `brambled`, under qemu as a Pi 4 (cortex-a72: NEON) and a Pi 5
# (cortex-a76: NEON + dotprod), serves a tiny synthetic model end to end:
# it starts, answers one NDJSON request and one HTTP request with the right
# done line and token counts, reports no allocation in its decode loops
# (`/health`), and exits 0 on SIGTERM. Prints
# `N passed, M failed` (scripts/test.sh adds it to its summary); exits
# non-zero if anything failed.
#
#   tests/daemon-aarch64.sh
#
# Both listeners are bound to port 0 on loopback and their ports are read from
# the daemon's log ("ndjson listening on ..."), so no port can be taken by
# someone else between choosing and binding it. The UART is off (`--uart none`).
# Timeouts only keep a broken daemon from hanging the run; nothing checks speed.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/aarch64-common.sh

tiny_model

# One NDJSON request, streamed: every line but the last is a piece of text,
# the last is the done line with the counts.
ndjson_check() { # HOST:PORT
    python3 - "$1" "$request_timeout" <<'EOF'
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=float(sys.argv[2])) as s:
    s.sendall(json.dumps({"prompt": "Hello world", "max_tokens": 5, "temperature": 0}).encode() + b"\n")
    lines = []
    with s.makefile("rb") as reader:
        for raw in reader:
            line = json.loads(raw)
            lines.append(line)
            if line.get("done"):
                break
last = lines[-1]
problems = []
if not last.get("done"): problems.append("no done line")
if "error" in last: problems.append(f"an error: {last['error']}")
if last.get("done_reason") not in ("length", "stop"): problems.append(f"done_reason {last.get('done_reason')!r}")
count = last.get("eval_count")
if last.get("done_reason") == "length" and count != 5: problems.append(f"eval_count {count}, expected 5")
if not isinstance(count, int) or not 0 < count <= 5: problems.append(f"eval_count {count!r}")
if not isinstance(last.get("prompt_eval_count"), int) or last["prompt_eval_count"] < 2:
    problems.append(f"prompt_eval_count {last.get('prompt_eval_count')!r}")
pieces = lines[:-1]
if not all(l.get("done") is False and isinstance(l.get("response"), str) for l in pieces):
    problems.append("a streamed line is not a text piece")
if problems:
    sys.exit(f"{'; '.join(problems)} in {lines}")
print(f"ndjson: {len(pieces)} pieces, {last['prompt_eval_count']} prompt tokens, {count} generated ({last['done_reason']})")
EOF
}

# One HTTP request: POST /v1/completions, not streamed; the usage adds up.
# Then /health: both requests served, and no allocation in either decode loop.
http_check() { # HOST:PORT
    python3 - "$1" "$request_timeout" <<'EOF'
import http.client, json, sys
host, port = sys.argv[1].rsplit(":", 1)
connection = http.client.HTTPConnection(host, int(port), timeout=float(sys.argv[2]))
connection.request("POST", "/v1/completions", json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}),
                   {"Content-Type": "application/json"})
response = connection.getresponse()
body = response.read().decode()
if response.status != 200:
    sys.exit(f"status {response.status}: {body}")
answer = json.loads(body)
choice, usage = answer["choices"][0], answer["usage"]
problems = []
if answer.get("object") != "text_completion": problems.append(f"object {answer.get('object')!r}")
if not isinstance(choice.get("text"), str): problems.append("no text")
if choice.get("finish_reason") == "length" and usage["completion_tokens"] != 3:
    problems.append(f"completion_tokens {usage['completion_tokens']}, expected 3")
if not 0 < usage["completion_tokens"] <= 3: problems.append(f"completion_tokens {usage['completion_tokens']}")
if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]: problems.append(f"usage {usage}")
# Both generations' decode loops, on the NEON kernels, allocated nothing (the daemon counts them).
connection.request("GET", "/health")
health = json.loads(connection.getresponse().read())
if health.get("served") != 2: problems.append(f"served {health.get('served')!r}, expected 2")
if health.get("decode_allocations") != {"total": 0, "last": 0}:
    problems.append(f"decode_allocations {health.get('decode_allocations')!r}")
if problems:
    sys.exit(f"{'; '.join(problems)} in {answer}")
print(f"http: {usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated ({choice['finish_reason']}); "
      f"decode loops allocated {health['decode_allocations']['total']}")
EOF
}

for cpu in cortex-a72 cortex-a76; do
    echo "== brambled for aarch64 under qemu -cpu $cpu"
    : >"$work/log"
    QEMU_CPU=$cpu qemu-aarch64 -L $sysroot "$brambled" --model "$work/tiny.bramble" \
        --uart none --ndjson 127.0.0.1:0 --http 127.0.0.1:0 --threads 2 2>"$work/log" &
    daemon_pid=$!

    wait_ready
    ndjson=$(listening ndjson)
    http=$(listening http)
    if grep -q '^brambled: info: ready' "$work/log" && [ -n "$ndjson" ] && [ -n "$http" ]; then
        check "$cpu: ready, ndjson on $ndjson, http on $http" 0
    else
        check "$cpu: ready" 1 "$(cat "$work/log")"
    fi

    if [ -n "$ndjson" ] && detail=$(ndjson_check "$ndjson" 2>&1); then
        check "$cpu: $detail" 0
    else
        check "$cpu: one NDJSON request" 1 "${detail:-no listener}"
    fi
    if [ -n "$http" ] && detail=$(http_check "$http" 2>&1); then
        check "$cpu: $detail" 0
    else
        check "$cpu: one HTTP request" 1 "${detail:-no listener}"
    fi

    # SIGTERM: drain and exit 0.
    terminate
    if kill -0 "$daemon_pid" 2>/dev/null; then
        check "$cpu: exits on SIGTERM" 1 "still running after ${ready_timeout} s"
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    else
        status=0
        wait "$daemon_pid" || status=$?
        if [ $status = 0 ] && grep -q '^brambled: info: stopped: 2 served' "$work/log"; then
            check "$cpu: SIGTERM: drained, exit 0" 0
        else
            check "$cpu: SIGTERM: drained, exit 0" 1 "exit status $status; log: $(cat "$work/log")"
        fi
    fi
    daemon_pid=
done

echo "brambled aarch64 end to end: $passed passed, $failed failed"
[ $failed = 0 ]
