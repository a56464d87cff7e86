"""Candidate Monte Carlo scores, measured on the runs of the one-class benchmark.

The one-class benchmark trains one GAN per digit and keeps each run's models. This script
loads those models and, without training again, tries other ways to score images against
the same Monte Carlo sample:

- nearest generated images, compared in raw pixels or after a Gaussian blur of each width;
- nearest generated images in a low-dimensional projection (the sample's top principal
  components) or in the discriminator's last hidden layer;
- a Gaussian kernel density estimate over the sample (blurred pixels).

For each it reports, per digit and on average:
- selection AUROC: held-out normal images against 5,000 training images of the other
  digits. Neither is trained on, and no test image is used, so this column can choose a
  variant without tuning on the test set;
- test AUROC, and the false alarm rate on normal test images at the Monte Carlo threshold
  (95th percentile of generated images, each scored against the rest of the sample), at
  the same threshold with each generated image weighted by the discriminator's density
  ratio D/(1 - D), and at the validation threshold.

    python benchmarks/one_class.py --data-path PATH/mnist.npz
    python benchmarks/score_variants.py --data-path PATH/mnist.npz \\
        [--runs benchmarks/results/runs] [--output benchmarks/results]

It writes score_variants.md and score_variants.json into --output.
"""

import argparse
import datetime
import logging
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gan_mc_anomaly as gma  # noqa: E402
import tables  # noqa: E402  (benchmarks/tables.py)

# Gaussian widths in pixels (0 = raw pixels), always including the script's default.
BLURS = tuple(sorted({0.0, 0.5, 1.0, 1.5, 2.0, gma.NEIGHBOUR_BLUR}))
COMPONENTS = (20, 50)  # principal components kept by the projected variants
OTHER_DIGITS = 5000  # training images of the other digits in the selection AUROC
KDE_KEPT_FOR_BANDWIDTH = 2000  # generated images whose neighbour distances set the bandwidth


def kernel_density_scores(queries, reference, bandwidth, self_indices=None, block_rows=500):
    """Return -log of the mean Gaussian kernel between each query and the reference images:
    higher where the generated sample is sparse. self_indices as in
    gma.nearest_generated_distances (a generated image never counts itself)."""
    import tensorflow as tf

    reference = tf.constant(reference, tf.float32)
    reference_sq = tf.reduce_sum(reference * reference, axis=1)
    queries = np.asarray(queries, np.float32)
    if self_indices is None:
        self_indices = np.full(len(queries), -1)
    scores = np.empty(len(queries))
    for start in range(0, len(queries), block_rows):
        block_self = np.asarray(self_indices[start:start + block_rows], np.int32)
        squared = tf.maximum(gma.squared_distances(queries[start:start + block_rows],
                                                   block_self, reference, reference_sq), 0.0)
        log_kernel = -squared / (2.0 * bandwidth ** 2)
        scores[start:start + block_rows] = np.log(reference.shape[0]) - tf.reduce_logsumexp(
            log_kernel, axis=1).numpy()
    return scores


def weighted_percentile(values, weights, percentile):
    """Return the smallest value below which `percentile`% of the total weight lies."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order]) / weights.sum()
    return values[order][np.searchsorted(cumulative, percentile / 100.0)]


def variants(generator, discriminator, reference, settings):
    """Return {name: (features, scorer)}: how each variant maps (n, 28, 28) images in [0, 1]
    to vectors, and scores vectors against the equally mapped reference."""
    import keras

    k = settings["NEIGHBOURS"]

    def nearest(queries, mapped_reference, self_indices=None):
        return gma.nearest_generated_distances(queries, mapped_reference, k, self_indices)

    found = {}
    for sigma in BLURS:
        found[f"nearest, blur {sigma:g}" if sigma else "nearest, raw pixels"] = (
            lambda images, sigma=sigma: gma.blur(images, sigma), nearest)
    flat = gma.blur(reference, 0.0)
    mean = flat.mean(axis=0)
    _, _, components = np.linalg.svd(flat - mean, full_matrices=False)
    for n in COMPONENTS:
        found[f"nearest, top {n} components"] = (
            lambda images, n=n: (gma.blur(images, 0.0) - mean) @ components[:n].T, nearest)
    hidden = keras.Model(discriminator.input, discriminator.layers[-2].output)
    found["nearest, discriminator features"] = (
        lambda images: hidden.predict(gma.to_model_input(images), batch_size=10_000,
                                      verbose=0), nearest)
    blurred = gma.blur(reference, 1.0)
    kept = min(KDE_KEPT_FOR_BANDWIDTH, len(blurred))
    bandwidth = float(np.median(nearest(blurred[:kept], blurred, np.arange(kept))))
    found["kernel density, blur 1"] = (
        lambda images: gma.blur(images, 1.0),
        lambda queries, mapped, self_indices=None: kernel_density_scores(
            queries, mapped, bandwidth, self_indices))
    return found


def measure_run(run_folder, data_path):
    """Return (digit, {variant: numbers}) for one one-class benchmark run."""
    from sklearn import metrics

    saved, generator, discriminator = gma.load_trained_run(run_folder)
    settings = {**gma.default_settings(), **saved["settings"], "DATA_PATH": data_path}
    digit = settings["NORMAL_DIGITS"][0]
    data = gma.prepare_data(settings)
    logits, reference = gma.monte_carlo_sample(
        generator, discriminator, settings["NEIGHBOUR_SAMPLES"], settings["MC_BATCH_SIZE"],
        settings["LATENT_DIM"], settings["SEED"], keep_images=settings["NEIGHBOUR_SAMPLES"])
    reference = reference.reshape(-1, *gma.IMAGE_SHAPE)
    density_ratio = np.exp(logits - logits.max())  # D / (1 - D), scaled; only ratios count
    x_train, y_train, *_ = gma.load_data(data_path)
    others = x_train[y_train != digit]
    others = others[np.random.default_rng(0).choice(len(others), min(OTHER_DIGITS,
                                                                      len(others)),
                                                     replace=False)]
    is_normal = data["y_test"] == digit

    found = {}
    for name, (features, scorer) in variants(generator, discriminator, reference,
                                             settings).items():
        started = time.perf_counter()
        mapped = np.asarray(features(reference), np.float32)
        generated = scorer(mapped, mapped, np.arange(len(mapped)))
        validation = scorer(np.asarray(features(data["validation"]), np.float32), mapped)
        test = scorer(np.asarray(features(data["x_test"]), np.float32), mapped)
        other = scorer(np.asarray(features(others), np.float32), mapped)
        percentile = settings["PERCENTILE"]
        monte_carlo = np.percentile(generated, percentile)
        weighted = weighted_percentile(generated, density_ratio, percentile)
        held_out = np.percentile(validation, percentile)
        found[name] = {
            "selection_auroc": float(metrics.roc_auc_score(
                np.r_[np.zeros(len(validation)), np.ones(len(other))],
                np.r_[validation, other])),
            "test_auroc": float(metrics.roc_auc_score(~is_normal, test)),
            "monte_carlo_false_alarm": float((test[is_normal] > monte_carlo).mean()),
            "weighted_monte_carlo_false_alarm": float((test[is_normal] > weighted).mean()),
            "validation_false_alarm": float((test[is_normal] > held_out).mean()),
        }
        logging.info("digit %d, %s: %s (%.0f s)", digit, name,
                     {k: round(v, 3) for k, v in found[name].items()},
                     time.perf_counter() - started)
    return digit, found


COLUMNS = [("selection_auroc", "selection AUROC"), ("test_auroc", "test AUROC"),
           ("monte_carlo_false_alarm", "false alarm (MC)"),
           ("weighted_monte_carlo_false_alarm", "false alarm (MC, D-weighted)"),
           ("validation_false_alarm", "false alarm (val.)")]


def markdown(results, header):
    """Return the mean table over the digits, then the test AUROC of each digit."""
    digits = sorted(results)
    names = list(results[digits[0]])
    lines = header + ["", "| variant | " + " | ".join(t for _, t in COLUMNS) + " |",
                      "|---|" + "---:|" * len(COLUMNS)]
    for name in names:
        means = [np.mean([results[d][name][key] for d in digits]) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(
            f"{m:.3f}" if "auroc" in key else f"{m:.1%}"
            for m, (key, _) in zip(means, COLUMNS)) + " |")
    lines += ["", "Test AUROC per digit:", "",
              "| variant | " + " | ".join(str(d) for d in digits) + " |",
              "|---|" + "---:|" * len(digits)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{results[d][name]['test_auroc']:.3f}" for d in digits) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tables.add_common_arguments(parser, "score_variants", digits=False)
    tables.add_runs_argument(parser)
    args = parser.parse_args(argv)
    tables.start_logging()
    results, folders, minutes = tables.measure_latest_runs(args, parser, measure_run)
    header = [
        f"Score variants on the one-class benchmark's runs in {args.runs} "
        f"({len(results)} digits, {minutes:.1f} minutes).",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores. "
        "Means over the digits; selection AUROC uses no test image.",
    ]
    tables.save_table(args.output, "score_variants", markdown(results, header), {
        "runs": folders, "minutes": minutes, "date": str(datetime.date.today()),
        "machine": platform.machine(), "cores": os.cpu_count(),
        "digits": {str(d): v for d, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
