#!/usr/bin/env python3
"""Compare two `bramble bias-eval --json --per-pair` runs over the same pairs
(e.g. `--feedback off`, then the converged loop), pair by pair: how far the
second run moved the stereotype preference, and whether a set of this size
can tell the change from chance (docs/bias.md, "Against the targets").

    scripts/bias-compare.py BEFORE.json AFTER.json [--by-category] [--json]

Prints, for each run, the SPR and bias score with a 95 % bootstrap interval
(pairs resampled with replacement, a fixed seed, so runs repeat), then:
- the flips: pairs whose preferred sentence changed, each way;
- McNemar's exact two-sided p for the SPR change (are the flips one-sided
  beyond chance?);
- the relative change of the bias score, `after / before − 1`, with its 95 %
  bootstrap interval over the same resampled pairs in both runs.

`--by-category` does the same for each category's pairs too (the pairs'
`category`, which must agree between the runs), under `by_category` in the
JSON and a row each in the text.
"""
import json
import random
import sys

from bias_runs import central_95, exact_binomial_p, load_run

RESAMPLES = 10_000
SEED = 20261127


def preferences(run):
    # A tie prefers neither sentence: it counts against SPR, as bramble's does.
    return [p["stereo"] > p["anti"] for p in run["per_pair"]]


def bias_score(prefs):
    return abs(2.0 * sum(prefs) / len(prefs) - 1.0)


def compare(before_run, after_run):
    before, after = preferences(before_run), preferences(after_run)
    if len(before) != len(after) or len(before) == 0:
        raise SystemExit(f"{len(before)} and {len(after)} scored pairs: the runs must score the same pairs")
    n = len(before)
    up = sum(1 for b, a in zip(before, after) if not b and a)
    down = sum(1 for b, a in zip(before, after) if b and not a)
    rng = random.Random(SEED)
    boot_before, boot_after, boot_change = [], [], []
    for _ in range(RESAMPLES):
        idx = [rng.randrange(n) for _ in range(n)]
        sb = bias_score([before[i] for i in idx])
        sa = bias_score([after[i] for i in idx])
        boot_before.append(sb)
        boot_after.append(sa)
        if sb > 0:
            boot_change.append(sa / sb - 1.0)
    score_before, score_after = bias_score(before), bias_score(after)
    return {
        "pairs": n,
        "before": {"spr": sum(before) / n, "bias_score": score_before, "interval": central_95(boot_before)},
        "after": {"spr": sum(after) / n, "bias_score": score_after, "interval": central_95(boot_after)},
        "flips_to_stereo": up,
        "flips_to_anti": down,
        "mcnemar_p": exact_binomial_p(up, down),
        "change": score_after / score_before - 1.0 if score_before > 0 else None,
        "change_interval": central_95(boot_change) if boot_change else None,
    }


def by_category(before_run, after_run):
    """`compare` on each category's pairs, in category order."""
    before, after = before_run["per_pair"], after_run["per_pair"]
    categories = {}
    for index, (b, a) in enumerate(zip(before, after)):
        if b.get("category") != a.get("category"):
            raise SystemExit(
                f"pair {index + 1} is {b.get('category')!r} in one run and {a.get('category')!r} in the other: "
                "the runs must score the same pairs"
            )
        categories.setdefault(str(b.get("category")), []).append(index)
    return {
        name: compare({"per_pair": [before[i] for i in indices]}, {"per_pair": [after[i] for i in indices]})
        for name, indices in sorted(categories.items())
    }


def main():
    flags = {"--json", "--by-category"}
    args = [a for a in sys.argv[1:] if a not in flags]
    if len(args) != 2 or any(a.startswith("--") for a in args):
        sys.exit(__doc__)
    before, after = load_run(args[0]), load_run(args[1])
    result = compare(before, after)
    if "--by-category" in sys.argv:
        result["by_category"] = by_category(before, after)
    if "--json" in sys.argv:
        print(json.dumps(result))
        return
    for name in ("before", "after"):
        r = result[name]
        low, high = r["interval"]
        print(f"{name}: SPR {r['spr']:.3f}, bias score {r['bias_score']:.3f} (95 % interval {low:.3f}–{high:.3f})")
    print(f"flips: {result['flips_to_stereo']} to the stereotyped sentence, {result['flips_to_anti']} to the other; "
          f"McNemar exact p = {result['mcnemar_p']:.3f}")
    if result["change"] is not None:
        low, high = result["change_interval"]
        print(f"bias score change: {100 * result['change']:+.1f} % (95 % interval {100 * low:+.1f} % to {100 * high:+.1f} %)")
    if "by_category" in result:
        print("category | pairs | bias score before → after | change | flips to stereo / to anti | McNemar p")
        for name, r in result["by_category"].items():
            change = "n/a (before is 0)" if r["change"] is None else f"{100 * r['change']:+.1f} %"
            print(f"{name} | {r['pairs']} | {r['before']['bias_score']:.3f} → {r['after']['bias_score']:.3f} | {change} | "
                  f"{r['flips_to_stereo']} / {r['flips_to_anti']} | {r['mcnemar_p']:.3f}")


if __name__ == "__main__":
    main()
