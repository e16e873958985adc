"""llama.cpp's first 16 greedy tokens of four fixed raw prompts, with their
ids (how they are taken: scripts/peer-reference.sh's header).

    python3 scripts/peer_greedy.py GGUF OUT.json BIN_DIR THREADS [LLAMA-COMPLETION ARGS...]

Extra arguments go to llama-completion after the greedy ones, e.g. `-ctk f32
-ctv f32 -fa off` (scripts/peer-greedy-spread.sh).
"""
import json, re, subprocess, sys
gguf, out, bin_dir, threads = sys.argv[1:5]
extra = sys.argv[5:]
prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "The three primary colors are",
]
n_predict = 16
results = []
for prompt in prompts:
    run = subprocess.run(
        [f"{bin_dir}/llama-completion", "-m", gguf, "-p", prompt, "-n", str(n_predict),
         "-t", threads, "-c", "128", "--temp", "0", "--top-k", "1", "--seed", "0",
         "-no-cnv", "-sp", "--no-escape", "--no-warmup", "--verbose-prompt", "--no-display-prompt"] + extra,
        stdin=subprocess.DEVNULL, capture_output=True, check=True)
    log = run.stderr.decode("utf-8", errors="replace")
    # --verbose-prompt: "number of tokens in prompt = N", then N lines "  ID -> 'piece'".
    n_prompt = int(re.search(r"number of tokens in prompt = (\d+)", log).group(1))
    after = log[log.index("number of tokens in prompt"):].splitlines()[1:]
    prompt_ids = [int(re.search(r"^\S+ I\s+(\d+) -> ", line).group(1)) for line in after[:n_prompt]]
    # The sampler accepts the prompt's tokens, then each generated one.
    n_generated = int(re.search(r"samplers time =.*/\s*(\d+) tokens", log).group(1)) - n_prompt
    text = run.stdout.decode("utf-8", errors="replace")
    assert text.endswith("\n\n"), repr(text[-40:])
    text = text[:-2]
    eog = text.endswith(" [end of text]\n")
    if eog:
        text = text[: -len(" [end of text]\n")]
    # The generated text tokenized alone (no BOS): prompt + text would let
    # the tokenizer merge across the boundary ("):" + "\n" is one Qwen token).
    tokenized = subprocess.run(
        [f"{bin_dir}/llama-tokenize", "-m", gguf, "--stdin", "--ids", "--no-bos", "--no-escape", "--log-disable"],
        input=text.encode("utf-8"), capture_output=True, check=True)
    ids = json.loads(tokenized.stdout.decode().strip().splitlines()[-1])
    checked = len(ids) == n_generated
    results.append({"prompt": prompt, "prompt_ids": prompt_ids, "ids": ids, "text": text,
                    "eog": eog, "n_generated": n_generated, "ids_checked": checked})
    print(f"{prompt!r} -> {text!r} ({n_generated} tokens{', eog' if eog else ''}, ids {'checked' if checked else 'NOT checked'})",
          file=sys.stderr)
# One record a few lines, each id list on one line.
with open(out, "w") as f:
    f.write("[\n" + ",\n".join(
        "  {" + ",\n   ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in r.items()) + "}"
        for r in results) + "\n]\n")
