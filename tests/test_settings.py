"""Settings: every bad value stops the run before any data is loaded, naming the setting."""

import os
import subprocess
import sys

import pytest

from conftest import gma, TINY_FLAGS

SCRIPT = gma.__file__


def with_setting(name, value):
    settings = gma.default_settings()
    settings[name] = value
    return settings


def test_the_defaults_are_valid():
    assert gma.check_settings(gma.default_settings()) is None


BAD_SETTINGS = [
    ("DATA_PATH", "/no/such/mnist.npz", "DATA_PATH = '/no/such/mnist.npz': no such file"),
    ("DATA_PATH", 3, "DATA_PATH = 3 is not valid: expected None or the path"),
    ("NORMAL_DIGITS", (), "NORMAL_DIGITS = \\(\\) is not valid: expected a non-empty tuple"),
    ("NORMAL_DIGITS", (10,), "NORMAL_DIGITS = \\(10,\\) is not valid: expected .* digits 0-9"),
    ("NORMAL_DIGITS", (1, 1), "NORMAL_DIGITS = \\(1, 1\\) is not valid: expected .*distinct"),
    ("NORMAL_DIGITS", 3, "NORMAL_DIGITS = 3 is not valid"),
    ("LATENT_DIM", 0, "LATENT_DIM = 0 is not valid: expected an integer >= 1"),
    ("LATENT_DIM", 2.5, "LATENT_DIM = 2.5 is not valid: expected an integer >= 1"),
    ("GENERATOR_WIDTHS", (), "GENERATOR_WIDTHS = \\(\\) is not valid: expected a non-empty"),
    ("GENERATOR_WIDTHS", (64, 0), "GENERATOR_WIDTHS = \\(64, 0\\) is not valid"),
    ("DISCRIMINATOR_WIDTHS", (-1,), "DISCRIMINATOR_WIDTHS = \\(-1,\\) is not valid"),
    ("EPOCHS", 0, "EPOCHS = 0 is not valid: expected an integer >= 1"),
    ("EPOCHS", True, "EPOCHS = True is not valid: expected an integer >= 1"),
    ("BATCH_SIZE", -5, "BATCH_SIZE = -5 is not valid: expected an integer >= 1"),
    ("LEARNING_RATE", 0.0, "LEARNING_RATE = 0.0 is not valid: expected a number in \\(0, 1\\)"),
    ("LEARNING_RATE", 1.5, "LEARNING_RATE = 1.5 is not valid"),
    ("LEARNING_RATE", float("nan"), "LEARNING_RATE = nan is not valid"),
    ("LEARNING_RATE", None, "LEARNING_RATE = None is not valid: expected a number in"),
    ("PERCENTILE", "95", "PERCENTILE = '95' is not valid: expected a number in \\(0, 100\\)"),
    ("VALIDATION_FRACTION", None, "VALIDATION_FRACTION = None is not valid"),
    ("ADAM_BETA_1", 1.0, "ADAM_BETA_1 = 1.0 is not valid: expected a number in \\[0, 1\\)"),
    ("ADAM_BETA_1", -0.1, "ADAM_BETA_1 = -0.1 is not valid"),
    ("SEED", -1, "SEED = -1 is not valid: expected an integer from 0 to 4294967295"),
    ("SEED", 2 ** 32, "SEED = 4294967296 is not valid: expected an integer from 0 to "),
    ("DEVICE", "gpu0", "DEVICE = 'gpu0' is not valid: expected a TensorFlow device name"),
    ("DEVICE", "/tpu:0", "DEVICE = '/tpu:0' is not valid"),
    ("PRECISION", "float16", "PRECISION = 'float16' is not valid: expected one of "
     "\\('float32', 'mixed_float16', 'mixed_bfloat16'\\)"),
    ("MC_SAMPLES", 999, "MC_SAMPLES = 999 is not valid: expected an integer >= 1000"),
    ("MC_BATCH_SIZE", 0, "MC_BATCH_SIZE = 0 is not valid: expected an integer >= 1"),
    ("PERCENTILE", 100.0, "PERCENTILE = 100.0 is not valid: expected a number in \\(0, 100\\)"),
    ("PERCENTILE", 0, "PERCENTILE = 0 is not valid"),
    ("CONFIDENCE", 1.0, "CONFIDENCE = 1.0 is not valid: expected a number in \\(0, 1\\)"),
    ("MC_CORRECTION", 0.9, "MC_CORRECTION = 0.9 is not valid: expected a number in "
                           "\\[1, 10\\)"),
    ("MC_CORRECTION", "1.4", "MC_CORRECTION = '1.4' is not valid"),
    ("EARLY_GENERATOR", 1.0, "EARLY_GENERATOR = 1.0 is not valid: expected a number in "
                             "\\[0, 1\\)"),
    ("EARLY_GENERATOR", "0.25", "EARLY_GENERATOR = '0.25' is not valid"),
    ("SCORES", (), "SCORES = \\(\\) is not valid: expected a non-empty tuple of distinct names"),
    ("SCORES", ("nearest",), "SCORES = \\('nearest',\\) is not valid: .*'nearest_generated'"),
    ("NEIGHBOURS", 0, "NEIGHBOURS = 0 is not valid: expected an integer >= 1"),
    ("NEIGHBOUR_SAMPLES", 1, "NEIGHBOUR_SAMPLES = 1 is not valid: expected an integer >= 2"),
    ("NEIGHBOUR_SAMPLES", 5, "NEIGHBOURS = 5 is not below NEIGHBOUR_SAMPLES = 5"),
    ("NEIGHBOURS", 20_000, "NEIGHBOURS = 20000 is not below NEIGHBOUR_SAMPLES = 20000: "),
    ("NEIGHBOUR_SAMPLES", 200_000, "NEIGHBOUR_SAMPLES = 200000 is larger than MC_SAMPLES"),
    ("NEIGHBOUR_BLUR", -0.5, "NEIGHBOUR_BLUR = -0.5 is not valid: expected a number in "
                             "\\[0, 5\\)"),
    ("NEIGHBOUR_BLUR", 5, "NEIGHBOUR_BLUR = 5 is not valid"),
    ("NEIGHBOUR_BLUR", "1", "NEIGHBOUR_BLUR = '1' is not valid"),
    ("VALIDATION_FRACTION", 0.5, "VALIDATION_FRACTION = 0.5 is not valid: expected a number "
                                 "in \\[0, 0.5\\)"),
    ("CLASSIFY_WITH", "test", "CLASSIFY_WITH = 'test' is not valid: expected one of "
                              "\\('validation', 'monte_carlo', 'early_generator'\\)"),
    ("LOAD_RUN", "/no/such/run", "LOAD_RUN = '/no/such/run': no such folder"),
    ("SCORE_IMAGES", "/no/such/images.npy", "SCORE_IMAGES = '/no/such/images.npy': no such "
                                            "file or folder"),
    ("FRESH_SAMPLE", 1, "FRESH_SAMPLE = 1 is not valid: expected True or False"),
    ("FRESH_SAMPLE", True, "FRESH_SAMPLE = True needs LOAD_RUN"),
    ("OUTPUT_DIR", "", "OUTPUT_DIR = '' is not valid: expected a folder path"),
    ("SHOW_PLOTS", "yes", "SHOW_PLOTS = 'yes' is not valid: expected True or False"),
]


@pytest.mark.parametrize("name, value, message", BAD_SETTINGS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_each_bad_setting_is_named_with_its_value_and_accepted_values(name, value, message):
    with pytest.raises(gma.SettingsError, match=message):
        gma.check_settings(with_setting(name, value))


def test_every_setting_has_a_bad_value_test():
    assert set(gma.SETTING_NAMES) <= {name for name, _, _ in BAD_SETTINGS}


def test_validation_threshold_needs_held_out_images():
    settings = with_setting("VALIDATION_FRACTION", 0.0)
    with pytest.raises(gma.SettingsError, match="CLASSIFY_WITH = 'validation' needs held-out "
                                                "images, but VALIDATION_FRACTION = 0"):
        gma.check_settings(settings)
    settings["CLASSIFY_WITH"] = "monte_carlo"
    assert gma.check_settings(settings) is None


def test_early_generator_threshold_needs_the_early_generator():
    settings = {**with_setting("EARLY_GENERATOR", 0.0), "CLASSIFY_WITH": "early_generator"}
    with pytest.raises(gma.SettingsError, match="CLASSIFY_WITH = 'early_generator' needs the "
                                                "early generator, but EARLY_GENERATOR = 0"):
        gma.check_settings(settings)
    settings["EARLY_GENERATOR"] = 0.5
    assert gma.check_settings(settings) is None
    settings["EPOCHS"] = 1  # half of one epoch rounds to the last: no early generator
    with pytest.raises(gma.SettingsError, match="EARLY_GENERATOR = 0.5 of EPOCHS = 1 falls on "
                                                "the last epoch: expected a smaller"):
        gma.check_settings(settings)


def test_data_path_that_is_a_folder(tmp_path):
    with pytest.raises(gma.SettingsError, match="DATA_PATH = .*: is a folder. Expected None"):
        gma.check_settings(with_setting("DATA_PATH", str(tmp_path)))


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "runs"
    path.write_text("")
    with pytest.raises(gma.SettingsError, match="OUTPUT_DIR = .* is a file: expected a folder"):
        gma.check_settings(with_setting("OUTPUT_DIR", str(path)))


def test_unwritable_output_dir_fails_before_any_data_is_loaded(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    settings = with_setting("OUTPUT_DIR", str(blocker / "runs"))  # a folder inside a file
    monkeypatch.setattr(gma, "load_data", lambda path: pytest.fail("data was loaded"))
    with pytest.raises(gma.SettingsError, match="OUTPUT_DIR = .* cannot be written"):
        gma.run(settings)


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "5000", "BATCH_SIZE = 5000 is larger than the 360 training images of "
                             "NORMAL_DIGITS = \\(3,\\)"),
    ("--validation-fraction", "0.01", "VALIDATION_FRACTION = 0.01 holds out only 4 images of "
                                      "NORMAL_DIGITS = \\(3,\\)"),
])
def test_settings_that_do_not_fit_the_data_fail_before_training(tmp_path, mnist_npz,
                                                                 monkeypatch, flag, value,
                                                                 message):
    settings = gma.parse_args(TINY_FLAGS + ["--data-path", mnist_npz, "--output-dir",
                                            str(tmp_path), "--normal-digits", "3", flag, value])
    monkeypatch.setattr(gma, "train_gan", lambda *a: pytest.fail("training started"))
    with pytest.raises(gma.SettingsError, match=message):
        gma.run(settings)
    assert os.listdir(tmp_path) == []  # the run folder made for it is removed again


def test_images_to_score_are_checked_before_training(tmp_path, mnist_npz, monkeypatch):
    import numpy as np

    bad_images = tmp_path / "images.npy"
    np.save(bad_images, np.zeros((4, 50, 784), np.uint8))
    monkeypatch.setattr(gma, "run", lambda settings: pytest.fail("the run started"))
    code = gma.main(["--data-path", mnist_npz, "--output-dir", str(tmp_path / "runs"),
                     "--score-images", str(bad_images)])
    assert code == 2
    assert not (tmp_path / "runs").exists()


def test_flags_override_the_constants():
    settings = gma.parse_args(["--epochs", "3", "--normal-digits", "4", "7", "--show-plots",
                               "--data-path", "x.npz", "--learning-rate", "0.001"])
    assert settings["EPOCHS"] == 3
    assert settings["NORMAL_DIGITS"] == (4, 7)
    assert settings["SHOW_PLOTS"] is True
    assert settings["DATA_PATH"] == "x.npz"
    assert settings["LEARNING_RATE"] == 0.001
    untouched = {k: v for k, v in settings.items()
                 if k not in ("EPOCHS", "NORMAL_DIGITS", "SHOW_PLOTS", "DATA_PATH",
                              "LEARNING_RATE")}
    assert untouched == {k: v for k, v in gma.default_settings().items() if k in untouched}


def test_help_lists_every_setting_with_its_comment():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    comments = gma.setting_comments()
    assert set(comments) == set(gma.SETTING_NAMES)
    help_text = " ".join(result.stdout.split())
    for name in gma.SETTING_NAMES:
        assert gma.flag_name(name) in help_text
        assert " ".join(comments[name].split())[:30] in help_text


def test_bad_setting_on_the_command_line_exits_with_its_message(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--percentile", "120", "--output-dir",
                             str(tmp_path / "runs")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "PERCENTILE = 120.0 is not valid: expected a number in (0, 100)" in result.stderr
    assert not (tmp_path / "runs").exists()  # it stopped before making any run folder


def test_bad_flag_type_is_named_by_the_parser():
    result = subprocess.run([sys.executable, SCRIPT, "--epochs", "ten"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --epochs: invalid int value: 'ten'" in result.stderr
