"""A tiny real training run on real MNIST digits, read back from the files it writes."""

import csv
import json
import os

import numpy as np
import pytest

from conftest import gma, run_tiny

PROMISED_FILES = [
    "results.json", "training_log.csv", "anomaly.png", "normal.png", "score_histogram.png",
    "generated.png", "top_anomalies.png", "threshold_convergence.png", "roc_curve.png",
    "models/generator.keras", "models/discriminator.keras",
]


def test_every_promised_file_exists_and_is_not_empty(tiny_run):
    for name in PROMISED_FILES:
        path = os.path.join(tiny_run["run_dir"], name)
        assert os.path.isfile(path), name
        assert os.path.getsize(path) > 0, name


def test_results_hold_the_settings_versions_device_and_timings(tiny_run):
    assert tiny_run["settings"]["NORMAL_DIGITS"] == [0, 1]
    assert tiny_run["settings"]["EPOCHS"] == 2
    assert set(tiny_run["settings"]) == set(gma.SETTING_NAMES)
    assert {"tensorflow", "keras", "numpy", "scikit-learn"} <= set(tiny_run["versions"])
    assert tiny_run["device_requested"] == "/gpu:0"
    assert tiny_run["device_used"] in ("/gpu:0", "/cpu:0")
    timings = tiny_run["timings"]
    assert 0 < timings["training_s"] < timings["total_s"]


def test_threshold_lies_inside_its_interval_and_the_sample_range(tiny_run):
    mc = tiny_run["monte_carlo"]
    assert mc["samples"] == 3000
    assert mc["score_min"] <= mc["threshold_low"] <= mc["threshold"] <= mc["threshold_high"]
    assert mc["threshold_high"] <= mc["score_max"]
    assert mc["score_min"] <= mc["score_mean"] <= mc["score_max"]
    assert 0.0 <= mc["score_min"] and mc["score_max"] <= 1.0
    assert mc["convergence"][-1]["samples"] == 3000
    assert mc["convergence"][-1]["threshold"] == mc["threshold"]


def test_test_results_add_up(tiny_run):
    test = tiny_run["test"]
    confusion = test["confusion"]
    assert test["test_images"] == 1000 == sum(confusion.values())
    assert test["labelled_anomalies"] == 800  # 100 test images of each digit, 2 are normal
    assert confusion["true_positives"] + confusion["false_negatives"] == 800
    assert confusion["true_positives"] + confusion["false_positives"] == test["flagged"]
    for name in ("flag_rate", "auroc", "detection_rate", "false_alarm_rate", "precision", "f1"):
        assert 0.0 <= test[name] <= 1.0, name
    assert test["flag_rate"] == pytest.approx(test["flagged"] / 1000)
    assert test["detection_rate"] == pytest.approx(confusion["true_positives"] / 800)
    assert test["false_alarm_rate"] == pytest.approx(confusion["false_positives"] / 200)
    per_digit = test["flag_rate_per_digit"]
    assert sorted(per_digit) == [str(d) for d in range(10)]
    assert np.mean(list(per_digit.values())) == pytest.approx(test["flag_rate"])


def test_epoch_log_csv_has_one_finite_row_per_epoch(tiny_run):
    with open(os.path.join(tiny_run["run_dir"], "training_log.csv")) as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        values = [float(row[k]) for k in ("d_loss", "g_loss", "d_real", "d_fake", "seconds")]
        assert all(np.isfinite(values))
        assert 0 <= float(row["d_real"]) <= 1 and 0 <= float(row["d_fake"]) <= 1
    assert float(rows[-1]["d_loss"]) == pytest.approx(tiny_run["training"]["final_epoch"]
                                                      ["d_loss"])


def test_saved_models_reproduce_the_recorded_threshold(tiny_run):
    import keras

    models = os.path.join(tiny_run["run_dir"], "models")
    generator = keras.models.load_model(os.path.join(models, "generator.keras"))
    discriminator = keras.models.load_model(os.path.join(models, "discriminator.keras"))
    logits = gma.monte_carlo_logits(generator, discriminator, 3000, 1000, 8, seed=7)
    threshold = gma.percentile_interval(gma.anomaly_scores_from_logits(logits), 95.0, 0.95)[0]
    assert threshold == pytest.approx(tiny_run["monte_carlo"]["threshold"], rel=1e-5)


def test_summary_is_printed_with_the_recorded_numbers(tiny_run, capsys):
    text = gma.summary_text(tiny_run)
    assert f"{tiny_run['monte_carlo']['threshold']:.4g}" in text
    assert f"AUROC {tiny_run['test']['auroc']:.3f}" in text
    assert "digit" in text and "score" in text


def test_same_seed_gives_the_same_threshold_and_test_results(tmp_path, mnist_npz, tiny_run):
    again = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path)])
    assert again["run_dir"] != tiny_run["run_dir"]
    assert again["monte_carlo"]["threshold"] == tiny_run["monte_carlo"]["threshold"]
    assert again["test"] == tiny_run["test"]


def test_another_seed_gives_another_threshold(tmp_path, mnist_npz, tiny_run):
    other = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                      "--seed", "8"])
    assert other["monte_carlo"]["threshold"] != tiny_run["monte_carlo"]["threshold"]


def test_all_digits_normal_reports_flag_rates_without_detection_metrics(tmp_path, mnist_npz):
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--normal-digits", *map(str, range(10)), "--epochs", "1"])
    assert results["test"]["labelled_anomalies"] == 0
    assert "auroc" not in results["test"]
    assert 0.0 <= results["test"]["flag_rate"] <= 1.0
    assert not os.path.exists(os.path.join(results["run_dir"], "roc_curve.png"))
    assert "flag rate (all test digits are normal)" in gma.summary_text(results)


def test_nan_loss_stops_training_and_saves_the_models(tmp_path, mnist_npz, monkeypatch):
    real_to_model_input = gma.to_model_input

    def poisoned(images):
        pixels = real_to_model_input(images)
        pixels[:] = np.inf  # every training image is infinite: the losses become NaN
        return pixels

    monkeypatch.setattr(gma, "to_model_input", poisoned)
    settings = gma.parse_args(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                               "--normal-digits", "0", "--epochs", "3", "--latent-dim", "8",
                               "--generator-widths", "16", "--discriminator-widths", "16"])
    with pytest.raises(gma.TrainingError, match="NaN or infinite in epoch 1") as error:
        gma.run(settings)
    run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    folder = os.path.join(run_dir, "diverged")
    assert folder in str(error.value)
    assert os.path.isfile(os.path.join(folder, "generator.keras"))
    assert os.path.isfile(os.path.join(folder, "discriminator.keras"))
    with open(os.path.join(run_dir, "training_log.csv")) as file:
        assert len(list(csv.DictReader(file))) == 1  # it stopped after the first epoch


def test_ctrl_c_saves_the_models_and_says_where(tmp_path, mnist_npz, monkeypatch):
    real_callbacks = gma.make_training_callbacks

    def interrupt_after_first_epoch(epochs, csv_path):
        callback = real_callbacks(epochs, csv_path)
        real_epoch_end = callback.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            real_epoch_end(epoch, logs)
            raise KeyboardInterrupt

        callback.on_epoch_end = on_epoch_end
        return callback

    monkeypatch.setattr(gma, "make_training_callbacks", interrupt_after_first_epoch)
    output_dir = str(tmp_path / "runs")
    code = gma.main(["--data-path", mnist_npz, "--output-dir", output_dir, "--epochs", "5",
                     "--normal-digits", "0", "--latent-dim", "8", "--generator-widths", "16",
                     "--discriminator-widths", "16"])
    assert code == 130
    run_dir = os.path.join(output_dir, os.listdir(output_dir)[0])
    assert os.path.isfile(os.path.join(run_dir, "interrupted", "generator.keras"))
    assert os.path.isfile(os.path.join(run_dir, "interrupted", "discriminator.keras"))
    assert not os.path.exists(os.path.join(run_dir, "results.json"))


def test_results_json_is_plain_json(tiny_run):
    with open(os.path.join(tiny_run["run_dir"], "results.json")) as file:
        assert json.load(file) == tiny_run
