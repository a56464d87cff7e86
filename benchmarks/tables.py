"""What the one-class benchmarks share: their common command-line arguments, and how each
saves its table as Markdown (to read) and JSON (every number, to compute with)."""

import glob
import json
import logging
import os
import time

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


def add_runs_argument(parser):
    """Add --runs: the folder of one-class benchmark runs that a benchmark reloads."""
    parser.add_argument("--runs", default=os.path.join(RESULTS, "runs"),
                        help="folder of one-class benchmark runs (one per digit)")


def measure_latest_runs(args, parser, measure_run):
    """Return ({digit: numbers}, folders, minutes): measure_run(folder, data path), which
    returns (digit, numbers), applied to the latest run of each digit in args.runs."""
    started = time.perf_counter()
    folders = latest_runs(args.runs, parser)
    results = dict(measure_run(folder, args.data_path) for folder in folders)
    return results, folders, (time.perf_counter() - started) / 60


def reload_run(run_folder, data_path):
    """Return (saved results, generator, discriminator, settings, data, reference) of a
    one-class benchmark run: its networks, its settings with this data path, its data split
    again, and the first NEIGHBOUR_SAMPLES images of its Monte Carlo sample, blurred as the
    nearest_generated score compares them (the rest of the sample is not drawn)."""
    import gan_mc_anomaly as gma  # the benchmark that calls this put it on sys.path

    saved, generator, discriminator = gma.load_trained_run(run_folder)
    settings = {**gma.default_settings(), **saved["settings"], "DATA_PATH": data_path}
    data = gma.prepare_data(settings)
    _, reference = gma.draw_monte_carlo(
        generator, discriminator, {**settings, "MC_SAMPLES": settings["NEIGHBOUR_SAMPLES"]})
    return saved, generator, discriminator, settings, data, reference


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
