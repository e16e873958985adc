#!/usr/bin/env bash
# Serves an image with brambled on loopback and points the official `openai`
# Python client at it: tests/daemon_openai.py's checks (completions and chat,
# whole and streamed, the model list, an error), then one chat question whose
# answer is printed, rendered with the image's own chat template.
#
#   scripts/serve-check.sh IMAGE [QUESTION]
#
# Uses target/release/brambled (CARGO_TARGET_DIR as cargo does); builds it if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: scripts/serve-check.sh IMAGE [QUESTION]}
question=${2:-What is the capital of France? Answer in one word.}
[ -f "$image" ] || { echo "serve-check: $image: no such file" >&2; exit 1; }
brambled="${CARGO_TARGET_DIR:-target}/release/brambled"
[ -x "$brambled" ] || cargo build --quiet --release -p bramble-board
log=$(mktemp)
port=$((20000 + RANDOM % 20000))
"$brambled" --model "$image" --uart none --http "127.0.0.1:$port" --ndjson none --threads 2 --context 512 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 120); do
    grep -q ready "$log" && break
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 1
done
grep -m1 -o '[a-z0-9]* dim [^,]*' "$log" || true
python3 tests/daemon_openai.py "http://127.0.0.1:$port/v1"
python3 - "http://127.0.0.1:$port/v1" "$question" <<'PY'
import sys
import openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused-on-loopback", max_retries=0, timeout=300)
reply = client.chat.completions.create(
    model="served", messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=16, temperature=0)
choice = reply.choices[0]
print(f"chat: {sys.argv[2]!r} -> {choice.message.content!r} ({choice.finish_reason}, {reply.usage.prompt_tokens} prompt tokens)")
PY
