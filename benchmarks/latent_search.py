"""The latent-search residual (AnoGAN's idea), measured on the one-class benchmark's runs.

For an image x, search the generator's noise space for the z whose image G(z) is closest to
x, and score x by what is left: the distance from x to G(z). A normal image should be drawn
closely by some z; another digit should not. This script loads each run that
benchmarks/one_class.py left (one per digit, without training again) and, per digit:

- starts each search from the noise of x's nearest image in the run's Monte Carlo sample
  (so the search begins where the nearest_generated score ends), then takes STEPS Adam
  steps on the squared pixel error;
- scores a fixed random subset of TEST_IMAGES test images, the held-out normal images and
  GENERATED_IMAGES fresh generated images (noise the sample never used);
- reports the test AUROC of the residual in raw pixels and after the script's blur, the
  false alarm rate on the normal test images at the 95th percentile of the generated
  images' residuals (a Monte Carlo threshold) and of the held-out images' residuals, and
  the nearest_generated score's AUROC on the same test subset, for comparison.

    python benchmarks/one_class.py --data-path PATH/mnist.npz
    python benchmarks/latent_search.py --data-path PATH/mnist.npz \\
        [--runs benchmarks/results/runs] [--output benchmarks/results]

It writes latent_search.md and latent_search.json into --output.
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

STEPS = 200  # Adam steps of each latent search
LEARNING_RATE = 0.02  # Adam learning rate on the noise vector
TEST_IMAGES = 2000  # test images scored per digit (a fixed random subset, all digits)
GENERATED_IMAGES = 2000  # fresh generated images whose residuals set the Monte Carlo threshold
SUBSET_SEED = 0  # picks the test subset, the same for every digit
FRESH_NOISE_SEED = 12345  # noise of the fresh generated images, not the sample's


def search_residuals(generator, images, start_noise, steps, learning_rate, sigma):
    """Return (raw, blurred): each image's distance to G(z) after the search, in raw pixels
    and after a blur of sigma pixels. images: (n, 784) in [0, 1]; start_noise: (n, latent)."""
    import tensorflow as tf

    target = tf.constant(images * 2.0 - 1.0, tf.float32)  # the generator draws in [-1, 1]
    noise = tf.Variable(start_noise, dtype=tf.float32)
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            error = tf.reduce_sum(tf.square(generator(noise, training=False) - target), axis=1)
            loss = tf.reduce_sum(error)
        optimizer.apply_gradients([(tape.gradient(loss, noise), noise)])

    for _ in range(steps):
        step()
    drawn = (generator(noise, training=False).numpy() + 1.0) / 2.0
    raw = np.linalg.norm(drawn - images, axis=1)
    blurred = np.linalg.norm(gma.blur(drawn, sigma) - gma.blur(images, sigma), axis=1)
    return raw, blurred


def sample_noise(settings):
    """Return the noise of the run's first NEIGHBOUR_SAMPLES Monte Carlo images."""
    return next(gma.noise_batches(settings["SEED"], settings["NEIGHBOUR_SAMPLES"],
                                  settings["LATENT_DIM"])).numpy()


def measure_run(run_folder, data_path):
    """Return (digit, numbers) for one one-class benchmark run."""
    import tensorflow as tf
    from sklearn import metrics

    _, generator, _, settings, data, reference = tables.reload_run(run_folder, data_path)
    digit = settings["NORMAL_DIGITS"][0]
    sigma, k = settings["NEIGHBOUR_BLUR"], settings["NEIGHBOURS"]
    noise = sample_noise(settings)
    reference_sq = np.sum(reference * reference, axis=1)

    chosen = np.random.default_rng(SUBSET_SEED).choice(
        len(data["x_test"]), min(TEST_IMAGES, len(data["x_test"])), replace=False)
    test = data["x_test"][chosen].reshape(-1, gma.IMAGE_PIXELS)
    is_anomaly = data["y_test"][chosen] != digit
    held_out = data["validation"].reshape(-1, gma.IMAGE_PIXELS)
    fresh_noise = tf.random.stateless_normal((GENERATED_IMAGES, settings["LATENT_DIM"]),
                                             seed=[FRESH_NOISE_SEED, digit])
    generated = gma.to_images(generator(fresh_noise, training=False).numpy()).reshape(
        -1, gma.IMAGE_PIXELS)

    started = time.perf_counter()
    residuals = {}
    for split, images in (("test", test), ("held_out", held_out), ("generated", generated)):
        # Start from the noise of the nearest image of the sample (blurred, as the score).
        blurred = gma.blur(images, sigma)
        nearest = np.empty(len(images), dtype=int)
        for start in range(0, len(images), 500):
            block = blurred[start:start + 500]
            squared = gma.squared_distances(block, np.full(len(block), -1, np.int32),
                                            reference, reference_sq).numpy()
            nearest[start:start + 500] = squared.argmin(axis=1)
        residuals[split] = search_residuals(generator, images, noise[nearest], STEPS,
                                            LEARNING_RATE, sigma)
        if split == "test":
            neighbour_scores = gma.nearest_generated_distances(blurred, reference, k)
    percentile = settings["PERCENTILE"]
    numbers = {"nearest_generated_auroc": float(metrics.roc_auc_score(is_anomaly,
                                                                      neighbour_scores))}
    for index, variant in enumerate(("raw", "blurred")):
        scores = residuals["test"][index]
        normal = scores[~is_anomaly]
        numbers[variant] = {
            "test_auroc": float(metrics.roc_auc_score(is_anomaly, scores)),
            "monte_carlo_false_alarm": float(
                (normal > np.percentile(residuals["generated"][index], percentile)).mean()),
            "validation_false_alarm": float(
                (normal > np.percentile(residuals["held_out"][index], percentile)).mean()),
        }
    logging.info("digit %d: %s (%.0f s)", digit, numbers, time.perf_counter() - started)
    return digit, numbers


def markdown(results, header):
    """Return the table: per digit and on average, each residual's numbers."""
    lines = header + ["", "| digit | nearest_generated AUROC | residual AUROC (raw / blurred) "
                      "| false alarm, MC threshold (raw / blurred) | false alarm, held-out "
                      "threshold (raw / blurred) |", "|---|---:|---:|---:|---:|"]
    rows = {**{str(d): results[d] for d in sorted(results)}, "**mean**": {
        "nearest_generated_auroc": np.mean([r["nearest_generated_auroc"]
                                            for r in results.values()]),
        **{v: {key: np.mean([r[v][key] for r in results.values()])
               for key in results[next(iter(results))][v]} for v in ("raw", "blurred")}}}
    for label, r in rows.items():
        lines.append(f"| {label} | {r['nearest_generated_auroc']:.3f} | "
                     f"{r['raw']['test_auroc']:.3f} / {r['blurred']['test_auroc']:.3f} | "
                     f"{r['raw']['monte_carlo_false_alarm']:.1%} / "
                     f"{r['blurred']['monte_carlo_false_alarm']:.1%} | "
                     f"{r['raw']['validation_false_alarm']:.1%} / "
                     f"{r['blurred']['validation_false_alarm']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tables.add_common_arguments(parser, "latent_search", digits=False)
    tables.add_runs_argument(parser)
    args = parser.parse_args(argv)
    tables.start_logging()
    results, folders, minutes = tables.measure_latest_runs(args, parser, measure_run)
    header = [
        f"Latent-search residual on the runs in {args.runs} ({len(results)} digits, "
        f"{minutes:.1f} minutes): {STEPS} Adam steps (learning rate {LEARNING_RATE:g}) from "
        f"the nearest sample image's noise; {TEST_IMAGES:,} test images per digit.",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores.",
    ]
    tables.save_table(args.output, "latent_search", markdown(results, header), {
        "runs": folders, "minutes": minutes, "date": str(datetime.date.today()),
        "machine": platform.machine(), "cores": os.cpu_count(), "steps": STEPS,
        "learning_rate": LEARNING_RATE, "test_images": TEST_IMAGES,
        "digits": {str(d): v for d, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
