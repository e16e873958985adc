#!/usr/bin/env python3
"""Does a regenerated reply reuse the cached conversation? (brambled, OpenAI API)

    target/release/brambled --model IMG --http 127.0.0.1:PORT --ndjson none --uart none --context 2048
    scripts/rewind-check.py PORT

Holds a five-turn conversation (150 tokens a reply, greedy), long enough to
take Gemma-3's 512-position sliding window past its end, then asks for the
last reply again twice (the same messages without it, as a client's
"regenerate" does), printing each request's prompt and cached tokens (the
`usage.prompt_tokens_details.cached_tokens` brambled reports) and its wall
time. A regenerate rewinds the session by the reply's length: with every
prompt token but the last cached, nothing ran again.
"""
import sys
import time

import openai


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
    messages = []
    asks = [
        "Tell me a long story about a lighthouse keeper.",
        "And his daughter?",
        "What happened in the storm?",
        "How did the village remember them?",
        "Describe the lighthouse today.",
    ]
    for ask in asks:
        messages.append({"role": "user", "content": ask})
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=150, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        usage = reply.usage
        print(f"turn: prompt {usage.prompt_tokens}, cached {usage.prompt_tokens_details.cached_tokens}")
    for _ in range(2):
        started = time.time()
        reply = client.chat.completions.create(model="m", messages=messages[:-1], max_tokens=150, temperature=0.8)
        usage = reply.usage
        print(
            f"regenerate: prompt {usage.prompt_tokens}, cached {usage.prompt_tokens_details.cached_tokens}, "
            f"{time.time() - started:.2f} s"
        )


if __name__ == "__main__":
    main()
