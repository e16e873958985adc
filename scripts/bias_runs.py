"""What the bias scripts beside this one share: reading runs (`bramble
bias-eval --json --per-pair`, `bias-generations.py run`), where a file that
cannot be read or is not a run ends the script with one line naming the
file and what is wrong, not a traceback; and the statistics they use."""
import json
import math
import sys


def exact_binomial_p(b, c):
    """Two-sided exact p of a b / c split under p = 1/2 (McNemar's exact test
    on b + c discordant pairs; the sign test on b positive, c negative)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def central_95(values):
    """The central 95 % of `values` (sorted here): [low, high]."""
    values = sorted(values)
    return [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]]


def wilson_95(successes, n):
    """The 95 % Wilson score interval [low, high] of a proportion
    `successes` / `n`, or None when n is 0. Unlike p ± 1.96 SE it stays
    inside [0, 1] and keeps its coverage near 0 and 1."""
    if n == 0:
        return None
    z = 1.959963984540054
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def load_checked(path, check, what):
    """The JSON object in `path`, after `check(obj)` raised no KeyError or
    TypeError; a file that cannot be read, is not JSON or fails the check
    ends the script with one line naming it (`what`: what it should be)."""
    try:
        with open(path) as f:
            obj = json.load(f)
        check(obj)
    except OSError as error:
        sys.exit(f"{path}: cannot read ({error.strerror})")
    except ValueError as error:
        sys.exit(f"{path}: not JSON ({error})")
    except (KeyError, TypeError):
        sys.exit(f"{path}: not {what}")
    return obj


def load_run(path):
    """The run's JSON object, with a `per_pair` list of stereo/anti log-probabilities."""

    def check(run):
        for pair in run["per_pair"]:
            float(pair["stereo"]) - float(pair["anti"])

    return load_checked(path, check, "a `bramble bias-eval --json --per-pair` run (no per_pair list of stereo/anti scores)")
