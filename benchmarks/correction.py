"""Measure MC_CORRECTION: how much farther real normal images lie from the generated sample
than generated images lie from each other, on the one-class benchmark's runs.

The Monte Carlo threshold of the nearest_generated score is the 95th percentile of the
generated images' distances to their nearest other generated images. Real images of the
normal digit lie a little off the surface the generator draws, so their distances are
larger, and that threshold flags far more than 5% of them. This script loads each run that
benchmarks/one_class.py left (one per digit, without training again), draws its Monte Carlo
sample again, scores its held-out normal images (which training never saw; no test image is
read) and reports, per digit:

- the gap: the held-out images' 95th percentile divided by the Monte Carlo threshold;
- the share of held-out images above the Monte Carlo threshold times each candidate factor.

The factor whose mean share over the digits comes nearest the 5% the percentile promises is
the one the script uses as MC_CORRECTION; the test set judges it afterwards, in the
one-class benchmark's "corrected" columns.

    python benchmarks/one_class.py --data-path PATH/mnist.npz
    python benchmarks/correction.py --data-path PATH/mnist.npz \\
        [--runs benchmarks/results/runs] [--output benchmarks/results]

It writes correction.md and correction.json into --output.
"""

import argparse
import datetime
import logging
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gan_mc_anomaly as gma  # noqa: E402
import tables  # noqa: E402  (benchmarks/tables.py)

FACTORS = np.round(np.arange(1.0, 2.0 + 1e-9, 0.005), 3)  # candidates, 1 = no correction


def measure_run(run_folder, data_path):
    """Return (digit, numbers) for one run: its Monte Carlo threshold, drawn again and
    checked against the recorded one, and the held-out images' scores."""
    saved, _, discriminator, settings, data, reference = tables.reload_run(run_folder,
                                                                           data_path)
    digit = settings["NORMAL_DIGITS"][0]
    generated = gma.generated_scores("nearest_generated", None, reference, settings)
    percentile = settings["PERCENTILE"]
    monte_carlo = float(np.percentile(generated, percentile))
    recorded = saved["scores"]["nearest_generated"]["thresholds"]["monte_carlo"]["value"]
    if not np.isclose(monte_carlo, recorded, rtol=1e-5):
        raise SystemExit(f"{run_folder}: the Monte Carlo threshold drawn again is "
                         f"{monte_carlo:.6g}, the run recorded {recorded:.6g}; the models and "
                         "results.json do not belong together")
    held_out = gma.image_scores("nearest_generated", discriminator, reference,
                                data["validation"], settings)
    numbers = {
        "run": run_folder, "percentile": percentile, "monte_carlo_threshold": monte_carlo,
        "held_out_images": len(held_out),
        "held_out_threshold": float(np.percentile(held_out, percentile)),
        "held_out_share": {f"{c:.3f}": float((held_out > c * monte_carlo).mean())
                           for c in FACTORS},
    }
    numbers["gap"] = numbers["held_out_threshold"] / monte_carlo
    logging.info("digit %d: Monte Carlo threshold %.4f, held-out %.4f, gap %.3f", digit,
                 monte_carlo, numbers["held_out_threshold"], numbers["gap"])
    return digit, numbers


def choose_factor(results, expected_share):
    """Return (factor, mean held-out share): the candidate whose mean share over the digits
    lies nearest expected_share (the smaller factor on a tie)."""
    means = {c: float(np.mean([r["held_out_share"][f"{c:.3f}"] for r in results.values()]))
             for c in FACTORS}
    best = min(FACTORS, key=lambda c: (abs(means[c] - expected_share), c))
    return float(best), means[best]


def markdown(results, factor, mean_share, header):
    """Return the table: per digit the thresholds, the gap and the share at the factor."""
    key = f"{factor:.3f}"
    lines = header + ["", "| digit | Monte Carlo threshold | held-out threshold | gap | "
                      f"held-out share above {factor:g} x Monte Carlo |",
                      "|---|---:|---:|---:|---:|"]
    for digit in sorted(results):
        r = results[digit]
        lines.append(f"| {digit} | {r['monte_carlo_threshold']:.3f} | "
                     f"{r['held_out_threshold']:.3f} | {r['gap']:.3f} | "
                     f"{r['held_out_share'][key]:.1%} |")
    gaps = [r["gap"] for r in results.values()]
    lines.append(f"| **mean** | | | {np.mean(gaps):.3f} | {mean_share:.1%} |")
    lines += ["", f"Factor measured here: {factor:g}, of the factors {FACTORS[0]:g} to "
              f"{FACTORS[-1]:g} in steps of {FACTORS[1] - FACTORS[0]:.3g} the one whose mean "
              "held-out share comes nearest the percentile's promise (the script's "
              f"MC_CORRECTION is {gma.MC_CORRECTION:g})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tables.add_common_arguments(parser, "correction", digits=False)
    tables.add_runs_argument(parser)
    args = parser.parse_args(argv)
    tables.start_logging()
    results, folders, minutes = tables.measure_latest_runs(args, parser, measure_run)
    percentiles = {r["percentile"] for r in results.values()}
    if len(percentiles) != 1:
        raise SystemExit(f"the runs used different PERCENTILE values {sorted(percentiles)}")
    expected_share = 1.0 - percentiles.pop() / 100.0
    factor, mean_share = choose_factor(results, expected_share)
    if factor in (FACTORS[0], FACTORS[-1]):
        logging.warning("The factor %g lies at the end of the candidates %g to %g: the gap is "
                        "outside them, so the factor that would bring the share to %.0f%% "
                        "was not found.", factor, FACTORS[0], FACTORS[-1], 100 * expected_share)
    header = [
        f"The gap between real and generated images, nearest_generated score, on the runs in "
        f"{args.runs} ({len(results)} digits, {minutes:.1f} minutes).",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores. "
        "Held-out normal images only; no test image is read.",
    ]
    tables.save_table(args.output, "correction", markdown(results, factor, mean_share, header),
                      {"runs": folders, "minutes": minutes, "date": str(datetime.date.today()),
                       "machine": platform.machine(), "cores": os.cpu_count(),
                       "factor": factor, "mean_held_out_share": mean_share,
                       "expected_share": expected_share,
                       "digits": {str(d): v for d, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
