"""Can other generators' images calibrate the Monte Carlo threshold? One-class MNIST.

The script's Monte Carlo threshold is the 95th percentile of generated images, each scored
by nearest_generated against the rest of its own sample. Those images lie on the surface
that this generator draws, as their neighbours do, so they score lower than real normal
images, which lie a little off it, and the threshold flags far more than 5% of normal test
images. A generator trained from another seed, or stopped earlier, draws a slightly
different surface: its images lie off this generator's surface, much as real images do.
This script measures how far that goes, still without any real image in the threshold; the
script's EARLY_GENERATOR setting was chosen from its table.

For each digit as the only normal class:
- train the script's GAN exactly as the script does (same seed, same steps), keeping its
  generator at the --fractions of training, and (unless --no-second-gan) a second GAN from
  seed SEED + 1 with the same snapshots;
- draw the script's Monte Carlo sample from the first and score the test set against it
  with nearest_generated, as the script does;
- set the threshold at the 95th percentile of NEIGHBOUR_SAMPLES images of each other
  generator, scored against that sample, and report the false alarm and detection rates on
  the test set beside the script's Monte Carlo and held-out thresholds. The images' noise
  comes from the seed SEED + 2, so the row of the script's own early generator differs a
  little from the script's early generator threshold, which draws other noise.

    python benchmarks/other_generators.py --data-path PATH/mnist.npz [--digits 0 1 ...] \\
        [--fractions 0.25 0.5 0.75] [--no-second-gan] [--output benchmarks/results] \\
        [any gan_mc_anomaly.py flag]

It writes other_generators.md and other_generators.json into --output. It trains two GANs
per digit, so it takes about twice as long as benchmarks/one_class.py; with --no-second-gan
(to compare many fractions of one GAN) about as long.
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

OWN, HELD_OUT = "own sample (MC)", "held-out real (val.)"


def train_with_snapshots(x_train, settings, snapshot_epochs):
    """Train the script's GAN on x_train (model inputs) as train_gan does; return it and
    {epoch: generator weights} at snapshot_epochs and at the last epoch."""
    gma.make_reproducible(settings["SEED"])  # as the script does before it trains
    gan = gma.build_gan(settings)
    snapshots = gma.make_generator_snapshots({*snapshot_epochs, settings["EPOCHS"]})
    started = time.perf_counter()
    gan.fit(gma.training_dataset(x_train, settings["BATCH_SIZE"], settings["SEED"]),
            epochs=settings["EPOCHS"], callbacks=[snapshots], verbose=0, shuffle=False)
    logging.info("Trained the GAN of seed %d for %d epochs in %.0f s.", settings["SEED"],
                 settings["EPOCHS"], time.perf_counter() - started)
    return gan, snapshots.weights


def blurred_sample(weights, discriminator, settings, seed):
    """Return NEIGHBOUR_SAMPLES images of a generator with these weights, drawn from the
    noise seed, blurred as the nearest_generated score compares them."""
    generator = gma.build_generator(settings["LATENT_DIM"], settings["GENERATOR_WIDTHS"],
                                    settings["PRECISION"])
    generator.set_weights(weights)
    # A Monte Carlo sample of NEIGHBOUR_SAMPLES images keeps them all as neighbours.
    return gma.draw_monte_carlo(generator, discriminator,
                                {**settings, "MC_SAMPLES": settings["NEIGHBOUR_SAMPLES"],
                                 "SEED": seed})[1]


def rates(test_scores, is_normal, validation_scores, threshold):
    """Return a threshold's false alarm and detection rates on the test set, and the share
    of held-out normal images it flags, which chooses between sources without the test."""
    return {"threshold": float(threshold),
            "false_alarm": float(np.mean(test_scores[is_normal] > threshold)),
            "detection": float(np.mean(test_scores[~is_normal] > threshold)),
            "held_out_flagged": float(np.mean(validation_scores > threshold))}


def measure_digit(settings, fractions, second_gan=True):
    """Return {"auroc": ..., "thresholds": {source: rates}} for the settings' one digit; the
    second GAN is trained, and its generators scored, only when second_gan is true."""
    import tensorflow as tf

    data = gma.prepare_data(settings)
    x_train = gma.to_model_input(data["normal_train"])
    epochs = settings["EPOCHS"]
    snapshot_epochs = sorted({min(epochs, max(1, round(f * epochs))) for f in fractions})
    device = gma.resolve_device(settings["DEVICE"])
    with tf.device(device):
        gan, own = train_with_snapshots(x_train, settings, snapshot_epochs)
        generators = {"this GAN": own}
        if second_gan:
            _, generators["second GAN"] = train_with_snapshots(
                x_train, {**settings, "SEED": settings["SEED"] + 1}, snapshot_epochs)
        discriminator = gan.discriminator
        mc_logits, reference = gma.draw_monte_carlo(gan.generator, discriminator, settings)
        score = "nearest_generated"
        generated = gma.generated_scores(score, mc_logits, reference, settings)
        test = gma.image_scores(score, discriminator, reference, data["x_test"], settings)
        validation = gma.image_scores(score, discriminator, reference, data["validation"],
                                      settings)
        # Each other generator's sample is a new call of monte_carlo_sample, which traces its
        # compiled functions again; TensorFlow would warn about every one of those retraces.
        tf.get_logger().setLevel("ERROR")
        others = {}
        for label, weights in generators.items():
            for epoch in sorted(weights):
                if label == "this GAN" and epoch == epochs:
                    continue  # that is the sample itself: the script's own threshold
                # Noise from another seed than the sample's, so no image repeats a sample
                # image's noise vector.
                images = blurred_sample(weights[epoch], discriminator, settings,
                                        settings["SEED"] + 2)
                others[f"{label}, epoch {epoch}"] = gma.nearest_generated_distances(
                    images, reference, settings["NEIGHBOURS"])

    is_normal = np.isin(data["y_test"], settings["NORMAL_DIGITS"])
    percentile = settings["PERCENTILE"]
    sources = {OWN: generated, **others, HELD_OUT: validation}
    return {"auroc": gma.ranking_quality(test, ~is_normal)["auroc"],
            "thresholds": {name: rates(test, is_normal, validation,
                                       np.percentile(values, percentile))
                           for name, values in sources.items()}}


def markdown(rows, header):
    """Return one table: per digit and threshold source, the false alarm / detection rates
    on the test set, then the means over the digits, with the share of held-out images
    flagged."""
    digits = list(rows)
    sources = list(rows[digits[0]]["thresholds"])
    lines = header + ["", "| threshold from | " + " | ".join(str(d) for d in digits)
                      + " | mean held-out flagged | mean false alarm | mean detection |",
                      "|---|" + "---:|" * (len(digits) + 3)]
    for source in sources:
        found = [rows[d]["thresholds"][source] for d in digits]
        lines.append(f"| {source} | " + " | ".join(
            f"{f['false_alarm']:.1%} / {f['detection']:.1%}" for f in found)
            + f" | {np.mean([f['held_out_flagged'] for f in found]):.1%}"
            + f" | {np.mean([f['false_alarm'] for f in found]):.1%}"
            + f" | {np.mean([f['detection'] for f in found]):.1%} |")
    lines.append("| *nearest_generated AUROC* | " + " | ".join(
        f"{rows[d]['auroc']:.3f}" for d in digits)
        + f" | | {np.mean([rows[d]['auroc'] for d in digits]):.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tables.add_common_arguments(parser, "other_generators")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="shares of training, in (0, 1], at which generators are kept")
    parser.add_argument("--no-second-gan", action="store_true",
                        help="train only the script's GAN (half the time), not one of seed "
                             "SEED + 1")
    args, script_flags = parser.parse_known_args(argv)
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions {args.fractions}: each must be in (0, 1]")
    settings = gma.parse_args(script_flags + ["--data-path", args.data_path])
    if "nearest_generated" not in settings["SCORES"] or settings["VALIDATION_FRACTION"] == 0:
        parser.error("the benchmark needs the nearest_generated score and held-out images: "
                     "keep it in SCORES and VALIDATION_FRACTION > 0")
    tables.start_logging()

    rows, started = {}, time.perf_counter()
    for digit in args.digits:
        digit_settings = {**settings, "NORMAL_DIGITS": (digit,)}
        gma.check_settings(digit_settings)
        rows[digit] = measure_digit(digit_settings, args.fractions, not args.no_second_gan)
        logging.info("Digit %d: %s", digit, {
            source: f"{found['false_alarm']:.1%}"
            for source, found in rows[digit]["thresholds"].items()})
    minutes = (time.perf_counter() - started) / 60

    changed = tables.changed_settings(settings, gma.default_settings())
    second = ("no second GAN" if args.no_second_gan
              else f"second GAN: seed {settings['SEED'] + 1}")
    header = [
        f"Monte Carlo thresholds from other generators' images, nearest_generated score "
        f"({len(args.digits)} digits, {minutes:.1f} minutes).",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores; "
        f"settings: {changed}; {second}.",
        "Each cell: false alarm / detection rate on the test set at the 95th percentile of "
        "that source's scores; every generated source is scored against the same sample. "
        "Held-out flagged: the share of the held-out normal images (no test image) above "
        "the threshold.",
    ]
    tables.save_table(args.output, "other_generators", markdown(rows, header), {
        "settings": gma.to_json_value(settings), "fractions": args.fractions,
        "second_gan": not args.no_second_gan,
        "minutes": minutes, "machine": platform.machine(), "cores": os.cpu_count(),
        "date": str(datetime.date.today()), "digits": {str(d): row for d, row in rows.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
