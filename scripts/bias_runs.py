"""Reading runs (`bramble bias-eval --json --per-pair`, `bias-generations.py
run`) for the scripts beside this one: a file that cannot be read or is not
a run ends the script with one line naming the file and what is wrong, not
a traceback."""
import json
import sys


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
