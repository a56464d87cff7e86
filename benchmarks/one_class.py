"""One-class MNIST benchmark: each digit in turn is the only normal class.

For every digit, the script's whole pipeline runs with that digit as NORMAL_DIGITS: train on
its training images, draw the Monte Carlo sample, score the full test set. Beside the GAN's
scores it reports a baseline without a GAN: the mean distance to the nearest *training*
images of the digit, thresholded on the same held-out images, so the table shows what the
generator adds.

    python benchmarks/one_class.py --data-path PATH/mnist.npz [--digits 0 1 ...] \
        [--output benchmarks/results] [any gan_mc_anomaly.py flag, e.g. --epochs 30]

It writes one_class.md (the table) and one_class.json (every number) into --output.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gan_mc_anomaly as gma  # noqa: E402
import tables  # noqa: E402  (benchmarks/tables.py)

BASELINE = "nearest_training"


def baseline_results(data, settings):
    """Return the no-GAN baseline's results: distance to the nearest training images,
    blurred as the nearest_generated score blurs, so the two differ only in the neighbours."""
    sigma, k = settings["NEIGHBOUR_BLUR"], settings["NEIGHBOURS"]
    train = gma.blur(data["normal_train"], sigma)
    validation = gma.nearest_generated_distances(gma.blur(data["validation"], sigma), train, k)
    test = gma.nearest_generated_distances(gma.blur(data["x_test"], sigma), train, k)
    threshold = gma.percentile_interval(validation, settings["PERCENTILE"],
                                        settings["CONFIDENCE"])[0]
    is_anomaly = ~np.isin(data["y_test"], settings["NORMAL_DIGITS"])
    return {"auroc": gma.ranking_quality(test, is_anomaly)["auroc"],
            "validation": gma.evaluate(test, data["y_test"], settings["NORMAL_DIGITS"],
                                       threshold)}


def digit_row(results, baseline):
    """Return the table row of one digit: per score, AUROC and rates at each threshold."""
    row = {}
    for name, score in results["scores"].items():
        row[name] = {"auroc": score["auroc"]}
        for source, test in score["test"].items():
            row[name][f"{source}_false_alarm"] = test["false_alarm_rate"]
            row[name][f"{source}_detection"] = test["detection_rate"]
    row[BASELINE] = {"auroc": baseline["auroc"],
                     "validation_false_alarm": baseline["validation"]["false_alarm_rate"],
                     "validation_detection": baseline["validation"]["detection_rate"]}
    return row


COLUMNS = [("auroc", "AUROC"), ("validation_false_alarm", "false alarm (val.)"),
           ("validation_detection", "detection (val.)"),
           ("monte_carlo_false_alarm", "false alarm (MC)"),
           ("monte_carlo_detection", "detection (MC)"),
           ("corrected_false_alarm", "false alarm (corr. MC)"),
           ("corrected_detection", "detection (corr. MC)"),
           ("early_generator_false_alarm", "false alarm (early gen.)"),
           ("early_generator_detection", "detection (early gen.)")]


def mean_rows(rows):
    """Return {score: {column: mean over the digits}} for the columns each score has."""
    first = next(iter(rows.values()))
    return {name: {key: float(np.mean([row[name][key] for row in rows.values()]))
                   for key in first[name]}
            for name in first}


def markdown_table(rows, header_lines):
    """Return the benchmark table as Markdown: a row per digit and score, then the means."""
    names = list(next(iter(rows.values())))
    lines = header_lines + ["", "| digit | score | " + " | ".join(t for _, t in COLUMNS) + " |",
                            "|---|---|" + "---:|" * len(COLUMNS)]

    def cells(values):
        return [("-" if key not in values else
                 f"{values[key]:.3f}" if key == "auroc" else f"{values[key]:.1%}")
                for key, _ in COLUMNS]

    for digit, row in rows.items():
        for name in names:
            lines.append(f"| {digit} | {name} | " + " | ".join(cells(row[name])) + " |")
    for name, means in mean_rows(rows).items():
        lines.append(f"| **mean** | {name} | " + " | ".join(cells(means)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tables.add_common_arguments(parser, "one_class", also_written=", and the runs in runs/")
    args, script_flags = parser.parse_known_args(argv)
    settings = gma.parse_args(script_flags + ["--data-path", args.data_path, "--output-dir",
                                              os.path.join(args.output, "runs")])
    if settings["CLASSIFY_WITH"] != "validation" or settings["VALIDATION_FRACTION"] == 0:
        parser.error("the benchmark needs held-out images: keep VALIDATION_FRACTION > 0")
    tables.start_logging()

    rows, started = {}, time.perf_counter()
    for digit in args.digits:
        digit_settings = {**settings, "NORMAL_DIGITS": (digit,)}
        gma.check_settings(digit_settings)
        results = gma.run(digit_settings)
        baseline = baseline_results(gma.prepare_data(digit_settings), digit_settings)
        rows[digit] = digit_row(results, baseline)
    minutes = (time.perf_counter() - started) / 60

    changed = tables.changed_settings(settings, gma.default_settings())
    header = [
        f"One-class MNIST: each digit alone is normal, the other nine are anomalies "
        f"({len(args.digits)} digits, {minutes:.1f} minutes).",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores, "
        f"device {results['device_used']}; settings: {changed}.",
        "Thresholds: val. = 95th percentile of held-out real images of the digit; MC = 95th "
        "percentile of generated images (the Monte Carlo threshold); corr. MC = the Monte "
        f"Carlo threshold times MC_CORRECTION = {settings['MC_CORRECTION']:g} (distance "
        "score only); early gen. = 95th percentile of the early generator's images, scored "
        "against the final sample.",
    ]
    tables.save_table(args.output, "one_class", markdown_table(rows, header), {
        "settings": gma.to_json_value(settings), "minutes": minutes,
        "machine": platform.machine(), "cores": os.cpu_count(),
        "date": str(datetime.date.today()), "digits": rows, "mean": mean_rows(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
