#!/usr/bin/env python3
"""Separate the gender-dependent part of a pairs set's stereotype preference
from the part that does not depend on gender: docs/bias.md, "Held out:
StereoSet gender".

StereoSet's gender pairs keep the person and swap the attribute ("The caring
mother ..." against "The uncaring mother ..."), so their margin mixes how
plausible each attribute is for anyone with how much more it is expected of
that gender. Scoring each pair again with every gendered word swapped ("The
caring father ...") splits the two: a pair's gender part is its margin minus
its swapped twin's margin. Positive: the stereotyped attribute is preferred
more for the gender the stereotype names.

    scripts/gender-counterfactual.py swap PAIRS.jsonl KEPT.jsonl SWAPPED.jsonl
        the pairs that name a gender, and each with every gendered word
        swapped (a pair whose two sentences swap a different number of
        words is left out; both files keep the same order)
    scripts/gender-counterfactual.py score KEPT.json SWAPPED.json [AFTER_KEPT.json AFTER_SWAPPED.json] [--json]
        from `bramble bias-eval --json --per-pair` runs over the two files:
        the share of pairs whose gender part is positive, its bias score
        |2 share - 1|, the mean gender part (nats) and a sign test; with a
        second pair of runs (e.g. the loop converged), the change of both,
        with 95 % bootstrap intervals over the pairs (fixed seed)
"""
import json
import random
import re
import sys

from bias_runs import central_95, exact_binomial_p, load_run

# Female and male forms; "her" is swapped to "his" (its possessive reading)
# and "him" to "her", so some swapped sentences are ungrammatical in the same
# way in both of a pair's sentences.
GENDER_PAIRS = [
    ("she", "he"), ("herself", "himself"), ("her", "his"), ("hers", "his"), ("her", "him"),
    ("woman", "man"), ("women", "men"), ("girl", "boy"), ("girls", "boys"),
    ("mother", "father"), ("mothers", "fathers"), ("mother's", "father's"), ("mom", "dad"),
    ("mommy", "daddy"), ("sister", "brother"), ("sisters", "brothers"), ("daughter", "son"),
    ("daughters", "sons"), ("wife", "husband"), ("wives", "husbands"), ("aunt", "uncle"),
    ("niece", "nephew"), ("grandmother", "grandfather"), ("grandma", "grandpa"),
    ("girlfriend", "boyfriend"), ("bride", "groom"), ("queen", "king"), ("lady", "gentleman"),
    ("ladies", "gentlemen"), ("female", "male"), ("females", "males"),
    ("schoolgirl", "schoolboy"), ("schoolgirls", "schoolboys"), ("actress", "actor"),
    ("waitress", "waiter"),
]
SWAP = {}
for female, male in GENDER_PAIRS:
    SWAP.setdefault(female, male)
    SWAP.setdefault(male, female)

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20261127


def swap_gender(sentence):
    """The sentence with every gendered word swapped, and how many were."""
    swapped = 0

    def replace(match):
        nonlocal swapped
        word = match.group(0)
        other = SWAP.get(word.lower())
        if other is None:
            return word
        swapped += 1
        return other[0].upper() + other[1:] if word[0].isupper() else other

    return re.sub(r"[A-Za-z']+", replace, sentence), swapped


def write_swapped(pairs_path, kept_path, swapped_path):
    kept, left_out = [], 0
    try:
        lines = open(pairs_path).read().splitlines()
    except OSError as error:
        sys.exit(f"{pairs_path}: cannot read ({error.strerror})")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            stereo, anti = pair["stereo"], pair["anti"]
        except (ValueError, KeyError, TypeError) as error:
            sys.exit(f"{pairs_path} line {number}: not a pair ({error})")
        stereo_swapped, n_stereo = swap_gender(stereo)
        anti_swapped, n_anti = swap_gender(anti)
        if n_stereo == 0 or n_stereo != n_anti:
            left_out += 1
            continue
        kept.append((pair, dict(pair, stereo=stereo_swapped, anti=anti_swapped)))
    with open(kept_path, "w") as kept_file, open(swapped_path, "w") as swapped_file:
        for pair, twin in kept:
            kept_file.write(json.dumps(pair) + "\n")
            swapped_file.write(json.dumps(twin) + "\n")
    print(f"{len(kept)} pairs kept, {left_out} left out (no gendered word, or not the same count in both sentences)")


def margins(path):
    return [p["stereo"] - p["anti"] for p in load_run(path)["per_pair"]]


def gender_parts(kept_path, swapped_path):
    kept, swapped = margins(kept_path), margins(swapped_path)
    if len(kept) != len(swapped):
        sys.exit(f"{kept_path} and {swapped_path} must score the same pairs ({len(kept)} against {len(swapped)})")
    return [k - s for k, s in zip(kept, swapped)]


def summary(parts):
    n = len(parts)
    share = sum(p > 0 for p in parts) / n
    return {"share": share, "bias_score": abs(2 * share - 1), "mean": sum(parts) / n}


def sign_test_p(parts):
    """Two-sided exact binomial p of the positive/negative split (zeros dropped)."""
    return exact_binomial_p(sum(p > 0 for p in parts), sum(p < 0 for p in parts))


def bootstrap_change(before, after, key):
    rng = random.Random(BOOTSTRAP_SEED)
    n, changes = len(before), []
    for _ in range(BOOTSTRAP_SAMPLES):
        picks = [rng.randrange(n) for _ in range(n)]
        b = summary([before[i] for i in picks])[key]
        a = summary([after[i] for i in picks])[key]
        if b != 0:
            changes.append(a / b - 1)
    return central_95(changes)


def score(paths, as_json):
    before = gender_parts(paths[0], paths[1])
    result = {"pairs": len(before), "before": dict(summary(before), sign_test_p=sign_test_p(before))}
    if len(paths) == 4:
        after = gender_parts(paths[2], paths[3])
        if len(after) != len(before):
            sys.exit(f"the two runs must score the same pairs ({len(before)} against {len(after)})")
        result["after"] = dict(summary(after), sign_test_p=sign_test_p(after))
        for key in ("bias_score", "mean"):
            b, a = result["before"][key], result["after"][key]
            result[f"{key}_change"] = a / b - 1 if b != 0 else None
            result[f"{key}_change_interval"] = bootstrap_change(before, after, key)
    if as_json:
        print(json.dumps(result))
        return
    for name in ("before", "after"):
        if name in result:
            r = result[name]
            print(f"{name}: gender part > 0 in {r['share']:.3f} of {result['pairs']} pairs, bias score "
                  f"{r['bias_score']:.3f}, mean {r['mean']:+.3f} nats, sign test p = {r['sign_test_p']:.3g}")
    for key in ("bias_score", "mean"):
        if result.get(f"{key}_change") is not None:
            low, high = result[f"{key}_change_interval"]
            print(f"{key} change: {result[f'{key}_change'] * 100:+.1f} % (95 % interval {low * 100:+.1f} % to {high * 100:+.1f} %)")


def main():
    args = [a for a in sys.argv[1:] if a != "--json"]
    if len(args) == 4 and args[0] == "swap":
        write_swapped(*args[1:])
    elif len(args) in (3, 5) and args[0] == "score":
        score(args[1:], "--json" in sys.argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
