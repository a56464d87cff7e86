"""What the one-class benchmarks share: their common command-line arguments, and how each
saves its table as Markdown (to read) and JSON (every number, to compute with)."""

import glob
import json
import logging
import os

RESULTS = os.path.join("benchmarks", "results")
# Settings that differ between the runs of one benchmark, or do not change what they hold.
PER_RUN = ("NORMAL_DIGITS", "OUTPUT_DIR", "DATA_PATH", "DEVICE", "SHOW_PLOTS", "MC_BATCH_SIZE",
           "MC_CORRECTION")


def add_common_arguments(parser, name, digits=True, also_written=""):
    """Add --data-path, --digits (when the benchmark trains per digit) and --output, whose
    help names the files `name`.md and `name`.json, and what else is written there."""
    parser.add_argument("--data-path", required=True, help="Keras-format mnist.npz")
    if digits:
        parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)),
                            help="digits to take in turn as the normal class")
    parser.add_argument("--output", default=RESULTS,
                        help=f"folder for {name}.md and {name}.json{also_written}")


def save_table(output, name, markdown, numbers):
    """Write markdown to output/name.md and numbers (plain JSON values) to output/name.json,
    then print the markdown."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, f"{name}.md"), "w", encoding="utf-8") as file:
        file.write(markdown)
    with open(os.path.join(output, f"{name}.json"), "w", encoding="utf-8") as file:
        json.dump(numbers, file, indent=2)
    print(markdown)


def start_logging():
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def changed_settings(settings, default_settings):
    """Return "NAME=value, ..." for the settings that differ from the script's defaults,
    leaving out those every benchmark sets itself; "the script defaults" when none do."""
    own = ("NORMAL_DIGITS", "OUTPUT_DIR", "DATA_PATH")
    changed = ", ".join(f"{k}={v}" for k, v in settings.items()
                        if k not in own and v != default_settings[k])
    return changed or "the script defaults"


def latest_runs(runs, parser):
    """Return the run folders in `runs` that hold results.json, the latest of each normal
    digit only (folder names start with the time, so they sort in time order); stop with a
    parser error when there are none."""
    latest, settings = {}, {}
    for results in sorted(glob.glob(os.path.join(runs, "*", "results.json"))):
        with open(results, encoding="utf-8") as file:
            recorded = json.load(file)["settings"]
        digits = tuple(recorded["NORMAL_DIGITS"])
        latest[digits] = os.path.dirname(results)
        settings[digits] = {k: v for k, v in recorded.items() if k not in PER_RUN}
    if not latest:
        parser.error(f"no run folders with results.json in {runs}: run "
                     "benchmarks/one_class.py first")
    differing = sorted({k for s in settings.values() for k in s
                        if any(other.get(k) != s[k] for other in settings.values())})
    if differing:
        parser.error(f"the latest runs of each digit in {runs} differ in {differing}: keep "
                     "one benchmark's runs in a folder (one_class.py --output)")
    return sorted(latest.values())
