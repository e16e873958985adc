#!/usr/bin/env python3
"""Split two `bramble bias-eval --json --per-pair` runs over the same pairs by
which gender each sentence names, and show how the second run moved each
group: docs/bias.md, "Against the targets".

    scripts/bias-by-gender.py PAIRS.jsonl BEFORE.json AFTER.json   # e.g. --feedback off, then static
"""
import json
import re
import sys

from bias_runs import load_run

FEMALE = set("she her hers herself woman women girl girls mother mothers wife wives daughter daughters "
             "sister sisters lady ladies female females mom moms aunt grandmother girlfriend bride queen".split())
MALE = set("he him his himself man men boy boys father fathers husband husbands son sons brother brothers "
           "gentleman gentlemen male males dad dads uncle grandfather boyfriend groom king guy guys".split())


def gender(sentence):
    words = re.findall(r"[a-z]+", sentence.lower())
    female = sum(w in FEMALE for w in words)
    male = sum(w in MALE for w in words)
    return "female" if female > male else "male" if male > female else "neither"


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    pairs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    before = load_run(sys.argv[2])["per_pair"]
    after = load_run(sys.argv[3])["per_pair"]
    if not len(pairs) == len(before) == len(after):
        sys.exit(f"{len(pairs)} pairs but {len(before)} and {len(after)} scores: were pairs skipped as too long?")
    groups = {}
    for pair, b, a in zip(pairs, before, after):
        key = f"{gender(pair['stereo'])} / {gender(pair['anti'])}"
        g = groups.setdefault(key, [0, 0, 0, 0.0, 0.0])
        g[0] += 1
        g[1] += b["stereo"] > b["anti"]
        g[2] += a["stereo"] > a["anti"]
        g[3] += b["stereo"] - b["anti"]
        g[4] += (a["stereo"] - a["anti"]) - (b["stereo"] - b["anti"])
    print("| stereo sentence / anti sentence | pairs | SPR before | SPR after | mean margin before | its shift |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, (n, spr_b, spr_a, margin, shift) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {key} | {n} | {spr_b / n:.3f} | {spr_a / n:.3f} | {margin / n:+.3f} | {shift / n:+.3f} |")


if __name__ == "__main__":
    main()
