"""Reading `bramble bias-eval --json --per-pair` runs for the scripts beside
this one: a file that cannot be read or is not a run ends the script with
one line naming the file and what is wrong, not a traceback."""
import json
import sys


def load_run(path):
    """The run's JSON object, with a `per_pair` list of stereo/anti log-probabilities."""
    try:
        with open(path) as f:
            run = json.load(f)
        for pair in run["per_pair"]:
            float(pair["stereo"]) - float(pair["anti"])
    except OSError as error:
        sys.exit(f"{path}: cannot read ({error.strerror})")
    except ValueError as error:
        sys.exit(f"{path}: not JSON ({error})")
    except (KeyError, TypeError):
        sys.exit(f"{path}: not a `bramble bias-eval --json --per-pair` run (no per_pair list of stereo/anti scores)")
    return run
