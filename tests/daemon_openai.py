#!/usr/bin/env python3
"""The official `openai` Python client against a running brambled.

    python3 tests/daemon_openai.py http://127.0.0.1:8080/v1

Completions and chat completions, whole and streamed, the model list, and an
error. Prints `openai client: N checks passed`; any failure raises.
"""
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=60)
checks = 0


def check(condition, message):
    global checks
    if not condition:
        raise AssertionError(message)
    checks += 1


models = client.models.list()
model = models.data[0].id
check(model, f"a model id: {models}")

completion = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0)
text = completion.choices[0].text
check(completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length", f"completion: {completion}")

pieces, usage = [], None
for chunk in client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0, stream=True):
    pieces.extend(choice.text for choice in chunk.choices)
    usage = chunk.usage or usage
check("".join(pieces) == text, f"streamed completion {''.join(pieces)!r} != {text!r}")

messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
reply = chat.choices[0].message.content
check(chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 0, f"chat: {chat}")

pieces, roles = [], []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0, stream=True):
    for choice in chunk.choices:
        roles.extend([choice.delta.role] if choice.delta.role else [])
        pieces.append(choice.delta.content or "")
check(roles == ["assistant"] and "".join(pieces) == reply, f"streamed chat {''.join(pieces)!r} != {reply!r}, roles {roles}")

try:
    client.completions.create(model=model, prompt="Hi", max_tokens=10**9)
    check(False, "max_tokens over the limit was accepted")
except openai.BadRequestError as error:
    check("max_tokens" in str(error), f"the error names the field: {error}")

print(f"openai client: {checks} checks passed")
