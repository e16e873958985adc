#!/usr/bin/env python3
"""How far any stereotype constraint can cut R, the distance from parity.

    scripts/bias-r-ceiling.py OFF.json [CONSTRAINED.json]
    scripts/bias-r-ceiling.py --linear DEV TEST


OFF.json is `bramble bias-eval --fill ITEMS --feedback off --json --per-item`
(CONSTRAINED.json the same with `--feedback static|adaptive`). R is
sqrt(mean (p_f - 0.5)^2) over the cue-free items, p_f = P(she) / (P(she) +
P(he)) of each item's whole sentence, as `bias-eval` reports it.

An oracle constraint that removes a group's lean exactly moves every item
of the group by the group's mean deviation from parity, so each group's
mean p_f becomes 0.5 and nothing else changes. Grouped by occupation, that
is a perfect removal of the occupation stereotype (a gap cut of 100 %); by
occupation and blank form (subject, object, possessive, reflexive), or also
by source (WinoBias type 1, type 2, templates), it removes more than any
occupation stereotype holds. What is left is each sentence's own lean,
which no constraint can remove without making the model indifferent to
what a sentence says about gender, the factual items' cues included.

--linear asks the same of the model's states: DEV and TEST are what
`cargo run --release -p bramble-tools --example site_states -- IMAGE
ITEMS OUT` writes for the dev and test fill items (every layer's residual
stream where the pronoun is chosen, and the first-token lean there). At
each layer a ridge regression on DEV predicts the cue-free items' lean
from the state (optionally also asked to predict no change on the
factual items), and the oracle subtracts the prediction from the lean
itself: a full-rank linear constraint applied exactly where the pronoun
is chosen, the most any linear erasure at that layer could do. It reports
what that leaves of R (first token) and of factual accuracy on TEST.
"""
import json
import sys

import numpy as np


def cue_free(path):
    try:
        report = json.load(open(path))
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: not a bias-eval --json report ({e})")
    if "per_item" not in report:
        sys.exit(f"{path}: no per_item scores; run bias-eval with --json --per-item")
    return {i["line"]: i for i in report["per_item"] if i["gender"] is None}


def rms(p):
    return float(np.sqrt(np.mean((p - 0.5) ** 2)))


def with_group_means_at_parity(p, groups):
    out = p.copy()
    for g in set(groups):
        out[groups == g] -= p[groups == g].mean() - 0.5
    return out


def sites(prefix):
    header, *lines = open(f"{prefix}.tsv").read().splitlines()
    words = header.split()
    if words[:2] != ["#", "layers"] or words[3] != "dim":
        sys.exit(f"{prefix}.tsv: no '# layers L dim D' header; write it with the site_states example")
    layers, dim = int(words[2]), int(words[4])
    table = [line.split("\t") for line in lines]
    states = np.fromfile(f"{prefix}.f32", dtype=np.float32).reshape(len(table), layers, dim)
    lean = np.array([float(r[1]) for r in table])
    listed, stated, occupation = (np.array([r[k] for r in table]) for k in (2, 3, 4))
    return states, lean, listed, stated, occupation


def first_token_figures(lean, stated):
    """R and skew of the cue-free sites, factual accuracy of the others (first token)."""
    cue_free = stated == "-"
    p = 1 / (1 + np.exp(lean[cue_free]))
    right = (lean[~cue_free] > 0) == (stated[~cue_free] == "male")
    return rms(p), p.mean() - 0.5, right.mean()


def linear(dev_prefix, test_prefix):
    dev, test = sites(dev_prefix), sites(test_prefix)
    layers = dev[0].shape[1]
    r_off, _, acc_off = first_token_figures(test[1], test[3])
    print(f"TEST, first token: R off {r_off:.4f}, factual accuracy off {acc_off:.3f}")
    best = {}
    for layer in range(layers):
        x = dev[0][:, layer].astype(np.float64)
        cue_free = dev[3] == "-"
        mean, spread = x[cue_free].mean(0), x[cue_free].std(0) + 1e-6
        z = (x - mean) / spread
        for factual_weight in (0.0, 1.0):
            for ridge in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
                # Cue-free rows predict their lean; factual rows (weighted) predict no change.
                factual = np.sqrt(factual_weight)
                rows = np.vstack([z[cue_free], factual * z[~cue_free]])
                intercept = np.r_[np.ones(cue_free.sum()), factual * np.ones((~cue_free).sum())]
                rows = np.hstack([rows, intercept[:, None]])
                target = np.r_[dev[1][cue_free], np.zeros((~cue_free).sum())]
                penalty = ridge * len(target) * np.eye(rows.shape[1])
                penalty[-1, -1] = 0
                w = np.linalg.solve(rows.T @ rows + penalty, rows.T @ target)
                zt = (test[0][:, layer] - mean) / spread
                r, _, acc = first_token_figures(test[1] - (zt @ w[:-1] + w[-1]), test[3])
                key = "factual kept" if acc >= acc_off - 0.02 else "any"
                for k in {key, "any"}:
                    if k not in best or r < best[k][0]:
                        best[k] = (r, layer, factual_weight, ridge, acc)
    for k, (r, layer, fw, ridge, acc) in sorted(best.items()):
        print(f"best ({k}): layer {layer}, factual weight {fw}, ridge {ridge}: R {r:.4f}, "
              f"cut {1 - r / r_off:.1%}, factual {acc - acc_off:+.3f}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--linear":
        return linear(sys.argv[2], sys.argv[3])
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    off = cue_free(sys.argv[1])
    lines = sorted(off)
    p = np.array([off[l]["p_female"] for l in lines])
    occupation = np.array([off[l]["occupation"] for l in lines])
    form = np.array([off[l]["form"] for l in lines])
    source = np.array([off[l]["source"] for l in lines])
    r_off = rms(p)
    print(f"{len(p)} cue-free items, R off {r_off:.4f}, skew {p.mean() - 0.5:+.4f}")
    print("oracle: each group's mean p_f set to 0.5 | R | R cut")
    groups = {
        "occupation (the whole stereotype)": occupation,
        "blank form": form,
        "occupation x form": np.char.add(np.char.add(occupation, "|"), form),
        "occupation x form x source": np.char.add(np.char.add(np.char.add(occupation, "|"), form), source),
    }
    for name, g in groups.items():
        r = rms(with_group_means_at_parity(p, g))
        print(f"  {name:<36} {r:.4f}  {1 - r / r_off:6.1%}")
    if len(sys.argv) == 3:
        on = cue_free(sys.argv[2])
        if sorted(on) != lines:
            sys.exit(f"{sys.argv[2]}: not the same cue-free items as {sys.argv[1]}")
        q = np.array([on[l]["p_female"] for l in lines])
        r = rms(q)
        ceiling = 1 - rms(with_group_means_at_parity(p, occupation)) / r_off
        print(f"constrained: R {r:.4f}, cut {1 - r / r_off:.1%} ({(1 - r / r_off) / ceiling:.0%} of the occupation oracle's)")


if __name__ == "__main__":
    main()
