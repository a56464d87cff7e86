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
    "models/generator.keras", "models/discriminator.keras", "models/early_generator.keras",
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
    assert {"tensorflow", "keras", "numpy", "scikit-learn", "scipy", "mlxtend",
            "pillow"} <= set(tiny_run["versions"])
    assert tiny_run["device_requested"] == "/gpu:0"
    assert tiny_run["device_used"] in ("/gpu:0", "/cpu:0")
    timings = tiny_run["timings"]
    assert 0 < timings["training_s"] < timings["total_s"]


def test_each_score_has_its_sample_thresholds_and_intervals(tiny_run):
    assert list(tiny_run["scores"]) == ["nearest_generated", "discriminator"]
    discriminator = tiny_run["scores"]["discriminator"]
    neighbours = tiny_run["scores"]["nearest_generated"]
    assert discriminator["generated"]["samples"] == 3000
    assert neighbours["generated"]["samples"] == 1000  # NEIGHBOUR_SAMPLES
    assert 0.0 <= discriminator["generated"]["min"] and discriminator["generated"]["max"] <= 1
    assert neighbours["generated"]["min"] > 0  # no generated image is its own neighbour
    for name, score in tiny_run["scores"].items():
        generated = score["generated"]
        assert generated["min"] <= generated["mean"] <= generated["max"], name
        corrected = ["corrected"] if name == "nearest_generated" else []
        assert list(score["thresholds"]) == ["monte_carlo", *corrected, "early_generator",
                                             "validation"]
        assert score["thresholds"]["validation"]["images"] == tiny_run["data"][
            "validation_images"] == 80  # 10% of the 800 training images of 0 and 1
        assert score["thresholds"]["early_generator"]["images"] == 1000  # NEIGHBOUR_SAMPLES
        for source, threshold in score["thresholds"].items():
            if source == "corrected":  # a factor times the Monte Carlo one, no interval
                assert threshold["low"] is None and threshold["high"] is None
                continue
            assert threshold["low"] <= threshold["value"] <= threshold["high"], name
        mc = score["thresholds"]["monte_carlo"]
        assert generated["min"] <= mc["low"] and mc["high"] <= generated["max"]
        assert generated["convergence"][-1]["samples"] == generated["samples"]
        assert generated["convergence"][-1]["threshold"] == mc["value"]
        # The early generator's threshold settles as its images accumulate, plotted beside.
        early = score["early_generated"]
        assert early["samples"] == early["convergence"][-1]["samples"] == 1000
        assert (early["convergence"][-1]["threshold"]
                == score["thresholds"]["early_generator"]["value"])


def test_corrected_threshold_is_the_monte_carlo_one_times_the_correction(tiny_run):
    thresholds = tiny_run["scores"]["nearest_generated"]["thresholds"]
    assert thresholds["corrected"]["value"] == pytest.approx(
        gma.MC_CORRECTION * thresholds["monte_carlo"]["value"])
    assert thresholds["corrected"]["factor"] == gma.MC_CORRECTION
    assert thresholds["corrected"]["images"] == thresholds["monte_carlo"]["images"]
    test = tiny_run["scores"]["nearest_generated"]["test"]
    assert test["corrected"]["flagged"] <= test["monte_carlo"]["flagged"]
    summary = gma.summary_text(tiny_run)
    row = next(line for line in summary.splitlines() if "corrected Monte Carlo (1,000)" in line)
    assert row.split()[0] == "nearest_generated"
    assert f"{thresholds['corrected']['value']:.4g} (x 1.375, no interval)" in row
    assert f"{test['corrected']['false_alarm_rate']:.1%}" in row
    assert ("Why this threshold classifies (CLASSIFY_WITH): it is measured on real normal "
            "images\n    that the GAN never saw") in summary


def test_the_held_out_gap_is_recorded_printed_and_warned_about_outside_its_range(tiny_run):
    score = tiny_run["scores"]["nearest_generated"]
    gap = score["thresholds"]["validation"]["value"] / score["thresholds"]["monte_carlo"]["value"]
    assert score["held_out_gap"] == pytest.approx(gap)
    assert gma.gap_warning(1.37) is None
    assert gma.gap_warning(gma.EXPECTED_GAP[0]) is None
    assert gma.gap_warning(gma.EXPECTED_GAP[1]) is None
    assert "1.61 times" in gma.gap_warning(1.61)
    too_wide = gma.gap_warning(2.0)
    assert "2.00 times the Monte Carlo one, outside the 1.2 to 1.6" in too_wide
    assert "will flag more normal images than it promises" in too_wide
    assert "will flag fewer normal images" in gma.gap_warning(1.1)
    line = gma.gap_lines(tiny_run)[0]
    assert f"the validation threshold is {gap:.3f} x the Monte Carlo one" in line
    assert line.endswith("see the warning).") == (gma.gap_warning(gap) is not None)


def test_the_correction_flag_sets_the_factor_and_the_run_warns_about_its_gap(
        tmp_path, mnist_npz, caplog):
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--mc-correction", "1.5", "--early-generator", "0"])
    score = results["scores"]["nearest_generated"]
    assert score["thresholds"]["corrected"]["factor"] == 1.5
    assert score["thresholds"]["corrected"]["value"] == pytest.approx(
        1.5 * score["thresholds"]["monte_carlo"]["value"])
    warning = gma.gap_warning(score["held_out_gap"])
    assert (warning is not None and warning in caplog.text) or (
        warning is None and "outside the 1.2 to 1.6" not in caplog.text)


def test_a_sample_of_identical_images_has_an_infinite_gap():
    scores = {"nearest_generated": {"thresholds": {"monte_carlo": {"value": 0.0},
                                                   "validation": {"value": 3.0}}}}
    assert gma.held_out_gap(scores) == float("inf")
    assert "inf times the Monte Carlo one" in gma.gap_warning(float("inf"))


def test_the_runs_monte_carlo_threshold_is_a_leave_one_out_percentile(tiny_run):
    """Score the run's own neighbours again by brute force: the recorded threshold must be
    the percentile of each generated image's distance to its nearest *other* images."""
    run_dir = tiny_run["run_dir"]
    saved, generator, discriminator = gma.load_trained_run(run_dir)
    settings = {**gma.default_settings(), **saved["settings"]}
    _, reference = gma.draw_monte_carlo(generator, discriminator, settings)
    reference = reference.astype(np.float64)
    squared = ((reference[:, None, :] - reference[None, :, :]) ** 2).sum(axis=2)
    k = settings["NEIGHBOURS"]

    def percentile_of_nearest(distances):
        nearest = np.sort(np.sqrt(np.maximum(distances, 0.0)), axis=1)[:, :k]
        return np.percentile(nearest.mean(axis=1), settings["PERCENTILE"])

    recorded = tiny_run["scores"]["nearest_generated"]["thresholds"]["monte_carlo"]["value"]
    np.fill_diagonal(squared, np.inf)
    assert recorded == pytest.approx(percentile_of_nearest(squared), rel=1e-4)
    # Counting each image as its own neighbour (distance 0) would give a clearly lower one.
    np.fill_diagonal(squared, 0.0)
    assert percentile_of_nearest(squared) < 0.9 * recorded


def test_test_results_add_up(tiny_run):
    for name, score in tiny_run["scores"].items():
        assert 0.0 <= score["auroc"] <= 1.0
        for test in score["test"].values():
            confusion = test["confusion"]
            assert test["test_images"] == 1000 == sum(confusion.values())
            assert test["labelled_anomalies"] == 800  # 100 test images a digit, 2 normal
            assert confusion["true_positives"] + confusion["false_negatives"] == 800
            assert confusion["true_positives"] + confusion["false_positives"] == test["flagged"]
            for key in ("flag_rate", "detection_rate", "false_alarm_rate", "precision", "f1"):
                assert 0.0 <= test[key] <= 1.0, key
            assert test["flag_rate"] == pytest.approx(test["flagged"] / 1000)
            assert test["detection_rate"] == pytest.approx(confusion["true_positives"] / 800)
            assert test["false_alarm_rate"] == pytest.approx(confusion["false_positives"] / 200)
            per_digit = test["flag_rate_per_digit"]
            assert sorted(per_digit) == [str(d) for d in range(10)]
            assert np.mean(list(per_digit.values())) == pytest.approx(test["flag_rate"])


def test_headline_is_the_first_score_at_the_chosen_threshold(tiny_run):
    head = tiny_run["headline"]
    assert head["score"] == "nearest_generated" and head["threshold_from"] == "validation"
    score = tiny_run["scores"]["nearest_generated"]
    assert head["threshold"] == score["thresholds"]["validation"]["value"]
    assert head["test"] == score["test"]["validation"]
    assert head["auroc"] == score["auroc"]


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


def test_results_record_how_the_training_step_was_compiled(tiny_run):
    # XLA changes the trained networks, so a run must say whether it used it.
    assert tiny_run["training"]["xla"] is gma.USE_XLA
    assert tiny_run["training"]["steps_per_call"] == gma.STEPS_PER_CALL


def test_saved_models_reproduce_the_recorded_thresholds(tiny_run, mnist_npz):
    import keras

    models = os.path.join(tiny_run["run_dir"], "models")
    generator = keras.models.load_model(os.path.join(models, "generator.keras"))
    discriminator = keras.models.load_model(os.path.join(models, "discriminator.keras"))
    settings = {k: tuple(v) if isinstance(v, list) else v
                for k, v in tiny_run["settings"].items()}
    logits, reference = gma.draw_monte_carlo(generator, discriminator, settings)
    assert len(logits) == 3000 and reference.shape == (1000, 784)
    for name, score in tiny_run["scores"].items():
        generated = gma.generated_scores(name, logits, reference, settings)
        threshold = gma.percentile_interval(generated, 95.0, 0.95)[0]
        assert threshold == pytest.approx(score["thresholds"]["monte_carlo"]["value"],
                                          rel=1e-5), name


def test_saved_early_generator_reproduces_the_recorded_early_thresholds(tiny_run):
    import keras

    models = os.path.join(tiny_run["run_dir"], "models")
    early = keras.models.load_model(os.path.join(models, "early_generator.keras"))
    generator = keras.models.load_model(os.path.join(models, "generator.keras"))
    discriminator = keras.models.load_model(os.path.join(models, "discriminator.keras"))
    settings = {k: tuple(v) if isinstance(v, list) else v
                for k, v in tiny_run["settings"].items()}
    # Two epochs: an eighth of them rounds to none, so the first epoch's generator is kept.
    assert tiny_run["training"]["early_generator_epoch"] == 1
    _, reference = gma.draw_monte_carlo(generator, discriminator, settings)
    early_sample = gma.draw_early_sample(early, discriminator, settings)
    assert early_sample[1].shape == (1000, 784)
    for name, score in tiny_run["scores"].items():
        scores = gma.early_generated_scores(name, early_sample, reference, settings)
        threshold = gma.percentile_interval(scores, 95.0, 0.95)[0]
        assert threshold == pytest.approx(score["thresholds"]["early_generator"]["value"],
                                          rel=1e-5), name


def test_early_generator_is_the_generator_of_a_run_stopped_at_that_epoch(tmp_path, digits):
    """Keeping the generator after half of four epochs must give exactly the generator that
    two epochs of the same training give, and not the final one."""
    x_train = gma.to_model_input(digits[0][digits[1] == 0][:256] / 255.0)
    settings = gma.parse_args(["--latent-dim", "8", "--generator-widths", "16",
                               "--discriminator-widths", "16", "--batch-size", "64",
                               "--seed", "3"])

    def train(epochs, early):
        gma.make_reproducible(3)
        return gma.train_gan(x_train, {**settings, "EPOCHS": epochs, "EARLY_GENERATOR": early},
                             str(tmp_path))

    generator, _, _, _, early_weights = train(4, 0.5)
    stopped, _, _, _, none_kept = train(2, 0.0)
    assert none_kept is None
    for kept, at_two in zip(early_weights, stopped.get_weights()):
        np.testing.assert_array_equal(kept, at_two)
    assert not all(np.array_equal(kept, final)
                   for kept, final in zip(early_weights, generator.get_weights()))


def test_without_an_early_generator_there_is_no_early_threshold(tmp_path, mnist_npz):
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--early-generator", "0"])
    assert results["training"]["early_generator_epoch"] == 0
    for name, score in results["scores"].items():
        corrected = ["corrected"] if name == "nearest_generated" else []
        assert list(score["thresholds"]) == ["monte_carlo", *corrected, "validation"]
    assert not os.path.exists(os.path.join(results["run_dir"], "models",
                                           "early_generator.keras"))


def test_classifying_with_the_early_generator_threshold(tmp_path, mnist_npz, capsys):
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--classify-with", "early_generator", "--epochs", "4"])
    head = results["headline"]
    score = results["scores"]["nearest_generated"]
    assert head["threshold_from"] == "early_generator"
    assert head["threshold"] == score["thresholds"]["early_generator"]["value"]
    assert head["test"] == score["test"]["early_generator"]
    assert results["training"]["early_generator_epoch"] == 1
    assert ("past 95% of the images of the generator as it stood after epoch 1"
            in capsys.readouterr().out)

    # Reused, the run classifies with its early generator's threshold too.
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((3, 28, 28), np.uint8))
    assert gma.main(["--load-run", results["run_dir"], "--score-images", str(images),
                     "--output-dir", str(tmp_path / "scored")]) == 0
    printed = capsys.readouterr().out
    assert "percentile of the loaded run's early generator's images" in printed
    assert f"threshold {head['threshold']:.4g}: flags" in printed

    # Its early generator's threshold is checked like the Monte Carlo one: an untrained
    # early generator in its place does not reproduce it.
    gma.build_generator(8, (32,)).save(os.path.join(results["run_dir"], "models",
                                                     "early_generator.keras"))
    with pytest.raises(gma.SettingsError, match="redrawing its early generator's sample gives "
                                                "a nearest_generated threshold of"):
        gma.score_with_run({**gma.default_settings(), "LOAD_RUN": results["run_dir"],
                            "SCORE_IMAGES": str(images),
                            "OUTPUT_DIR": str(tmp_path / "scored")})


def test_summary_is_printed_with_the_recorded_numbers(tiny_run, capsys):
    text = gma.summary_text(tiny_run)
    for score in tiny_run["scores"].values():
        for source, threshold in score["thresholds"].items():
            interval = ("(x 1.375, no interval)" if source == "corrected"
                        else f"[{threshold['low']:.4g}")
            assert f"{threshold['value']:.4g} {interval}" in text
        assert f"{score['auroc']:.3f}" in text
    assert "    anomaly: " + tiny_run["examples"]["anomaly"] in text
    assert "    normal:  " + tiny_run["examples"]["normal"] in text


def test_same_seed_gives_the_same_threshold_and_test_results(tmp_path, mnist_npz, tiny_run):
    again = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path)])
    assert again["run_dir"] != tiny_run["run_dir"]
    assert again["scores"] == tiny_run["scores"]


def test_another_seed_gives_another_threshold(tmp_path, mnist_npz, tiny_run):
    other = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                      "--seed", "8"])
    for name in ("discriminator", "nearest_generated"):
        assert (other["scores"][name]["thresholds"]["monte_carlo"]["value"]
                != tiny_run["scores"][name]["thresholds"]["monte_carlo"]["value"])


def test_all_digits_normal_without_held_out_images(tmp_path, mnist_npz, caplog, monkeypatch):
    # The original setting: every digit is normal, and only the Monte Carlo threshold: one
    # epoch leaves no epoch before the last to keep an early generator from.
    titles = {}
    plot_digit = gma.plot_digit

    def recording_plot_digit(image, title, path):
        titles[os.path.basename(path)] = title
        return plot_digit(image, title, path)

    monkeypatch.setattr(gma, "plot_digit", recording_plot_digit)
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--normal-digits", *map(str, range(10)), "--epochs", "1",
                        "--validation-fraction", "0", "--classify-with", "monte_carlo"])
    assert results["training"]["early_generator_epoch"] == 0
    assert ("EARLY_GENERATOR = 0.125 of EPOCHS = 1 falls on the last epoch, whose generator is "
            "the final one: this run has no early generator threshold.") in caplog.text
    assert results["data"]["validation_images"] == 0
    assert results["headline"]["threshold_from"] == "monte_carlo"
    for name, score in results["scores"].items():
        corrected = ["corrected"] if name == "nearest_generated" else []
        assert "auroc" not in score and list(score["thresholds"]) == ["monte_carlo", *corrected]
        assert "early_generated" not in score and "held_out_gap" not in score
        for test in score["test"].values():
            assert test["labelled_anomalies"] == 0 and "detection_rate" not in test
            assert 0.0 <= test["flag_rate"] <= 1.0
    assert not os.path.exists(os.path.join(results["run_dir"], "roc_curve.png"))
    assert os.path.isfile(os.path.join(results["run_dir"], "threshold_convergence.png"))
    summary = gma.summary_text(results)
    assert "flag rate (all test digits are normal)" in summary
    # With no anomalous digit, the highest-scoring example is not called an anomaly.
    assert titles["anomaly.png"].startswith("highest score: digit ")
    assert "    highest score: test image " in summary and "anomaly: test image" not in summary


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
    # An eighth of 5 epochs is the first: its generator was kept before the interruption.
    assert os.path.isfile(os.path.join(run_dir, "interrupted", "early_generator.keras"))
    assert not os.path.exists(os.path.join(run_dir, "results.json"))


def test_results_json_is_plain_json(tiny_run):
    with open(os.path.join(tiny_run["run_dir"], "results.json")) as file:
        assert json.load(file) == tiny_run


def test_examples_come_from_their_own_class(tiny_run):
    assert "(an anomalous digit)" in tiny_run["examples"]["anomaly"]
    assert "(a normal digit)" in tiny_run["examples"]["normal"]


def test_example_indices_pick_the_extremes_of_each_class():
    scores = np.array([0.1, 0.9, 0.5, 0.05, 0.7])
    labels = np.array([3, 0, 3, 1, 0])  # normal: 0; the lowest score (0.05) is an anomaly
    assert gma.example_indices(scores, labels, [0]) == (2, 4)
    assert gma.example_indices(scores, labels, list(range(10))) == (1, 3)


def test_test_set_of_anomalies_only(tmp_path, digits):
    x_train, y_train, x_test, y_test = digits
    keep = ~np.isin(y_test, [0, 1])
    path = tmp_path / "no_normal_test_digits.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test[keep], y_test=y_test[keep])
    results = run_tiny(["--data-path", str(path), "--output-dir", str(tmp_path / "runs"),
                        "--epochs", "1"])
    test = results["headline"]["test"]
    assert test["labelled_anomalies"] == test["test_images"] == 800
    text = gma.summary_text(results)
    assert "Every test image is an anomalous digit" in text
    assert "all test digits are normal" not in text


def test_training_data_without_the_normal_digits(tmp_path, digits):
    x_train, y_train, x_test, y_test = digits
    keep = y_train != 0
    path = tmp_path / "no_zeros.npz"
    np.savez(path, x_train=x_train[keep], y_train=y_train[keep], x_test=x_test, y_test=y_test)
    settings = gma.parse_args(["--data-path", str(path), "--output-dir", str(tmp_path / "r"),
                               "--normal-digits", "0"])
    with pytest.raises(gma.DataError, match=r"hold no digit of NORMAL_DIGITS = \(0,\); they "
                                            r"hold \[1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
        gma.run(settings)
    assert os.listdir(tmp_path / "r") == []


def test_ctrl_c_after_training_names_the_saved_models(tmp_path, mnist_npz, monkeypatch):
    def interrupted_sampling(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gma, "monte_carlo_sample", interrupted_sampling)
    settings = gma.parse_args(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                               "--normal-digits", "0", "--epochs", "1", "--latent-dim", "8",
                               "--generator-widths", "16", "--discriminator-widths", "16"])
    with pytest.raises(gma.TrainingInterrupted, match="Interrupted after training; the "
                                                      "trained models are saved in") as error:
        gma.run(settings)
    models = str(error.value).split("saved in ")[1].rstrip(".")
    assert os.path.isfile(os.path.join(models, "generator.keras"))


def test_ctrl_c_before_training_says_there_is_nothing_to_keep(tmp_path, mnist_npz,
                                                             monkeypatch, caplog):
    def interrupted_loading(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(gma, "load_data", interrupted_loading)
    code = gma.main(["--data-path", mnist_npz, "--output-dir", str(tmp_path)])
    assert code == 130
    assert "Interrupted before training finished: there are no trained models" in caplog.text


def test_missing_cpu_falls_back_to_the_first(caplog, monkeypatch):
    monkeypatch.setattr(gma, "_devices_reported", set())
    with caplog.at_level("INFO", logger="gan_mc_anomaly"):
        assert gma.resolve_device("/cpu:7") == "/cpu:0"
    assert "No CPU device /cpu:7" in caplog.text
    assert gma.resolve_device("/cpu:0") == "/cpu:0"


def test_missing_gpu_falls_back_to_the_cpu_and_says_so_once(caplog, monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(gma, "_devices_reported", set())
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    with caplog.at_level("INFO", logger="gan_mc_anomaly"):
        for _ in range(2):  # training, then scoring SCORE_IMAGES, each resolve the device
            assert gma.resolve_device("/gpu:0") == "/cpu:0"
    assert caplog.text.count("No GPU at /gpu:0 (TensorFlow sees 0 GPUs): running on the "
                             "CPU instead") == 1


def test_summary_does_not_round_a_high_auroc_up_to_always(tiny_run):
    import copy

    results = copy.deepcopy(tiny_run)
    results["headline"]["auroc"] = 0.997
    text = gma.summary_text(results)
    assert "outscores a random normal one 99.7% of the time" in text
    assert "100% of the time" not in text


def test_summary_never_prints_minus_zero_points(tiny_run):
    import copy

    results = copy.deepcopy(tiny_run)
    results["headline"]["test"]["false_alarm_rate"] = 0.0499  # 0.01 points under 5%
    text = gma.summary_text(results)
    assert "is 5.0%, +0.0 points from that" in text
    assert "-0.0 points" not in text


def test_library_versions_survive_a_missing_package(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_mlxtend(name, *args):
        if name == "mlxtend":
            raise ImportError("not installed")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_mlxtend)
    versions = gma.library_versions()
    assert versions["mlxtend"] == "unknown"
    assert versions["tensorflow"].count(".") >= 1 and versions["scipy"].count(".") >= 1


@pytest.mark.parametrize("precision, compute_dtype", [("mixed_float16", "float16"),
                                                      ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_computes_hidden_layers_in_16_bits_with_float32_outputs(
        tmp_path, mnist_npz, caplog, precision, compute_dtype):
    import keras

    caplog.set_level("INFO", logger="gan_mc_anomaly")
    results = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path),
                        "--precision", precision])
    assert f"PRECISION = '{precision}' on the CPU" in caplog.text
    with open(os.path.join(results["run_dir"], "training_log.csv"), encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and all(np.isfinite(float(row["g_loss"])) for row in rows)
    assert 0 <= results["scores"]["nearest_generated"]["auroc"] <= 1

    for name in ("generator", "discriminator"):
        model = keras.models.load_model(os.path.join(results["run_dir"], "models",
                                                     f"{name}.keras"))
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        assert [layer.compute_dtype for layer in dense] == (
            [compute_dtype] * (len(dense) - 1) + ["float32"])
        assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {"float32"}
        output = model(np.zeros((2, model.input_shape[-1]), np.float32))
        assert keras.backend.standardize_dtype(output.dtype) == "float32"


def test_only_float16_training_scales_its_losses_and_every_precision_updates_weights():
    import keras

    images = np.random.default_rng(0).uniform(-1, 1, (32 * 16, gma.IMAGE_PIXELS))
    for precision, scaled in (("float32", False), ("mixed_bfloat16", False),
                              ("mixed_float16", True)):
        settings = gma.parse_args(["--latent-dim", "4", "--generator-widths", "8",
                                   "--discriminator-widths", "8", "--precision", precision])
        gan = gma.build_gan(settings)
        before = [w.copy() for w in gan.generator.get_weights()]
        gan.fit(gma.training_dataset(images.astype(np.float32), 16, 0), epochs=1, verbose=0,
                shuffle=False)
        for optimizer in (gan.d_optimizer, gan.g_optimizer):
            assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == scaled
            # A float16 step whose scaled gradients overflow is skipped, not applied, and
            # the scale halves: most of the 32 steps must still have updated the weights.
            assert int(optimizer.iterations) >= 16
        after = gan.generator.get_weights()
        assert all(np.isfinite(w).all() for w in after)
        assert all(not np.array_equal(b, a) for b, a in zip(before, after))


def test_convergence_plot_draws_the_early_generators_threshold_beside_the_monte_carlo_one(
        tiny_run, tmp_path):
    import copy

    import matplotlib.pyplot as plt

    def drawn(results):
        """Return, per panel, {line label: last y value} of the figure written."""
        figure = gma.plot_convergence(results, 95.0, str(tmp_path / "convergence.png"))
        lines = [{line.get_label(): line.get_ydata()[-1] for line in axis.get_lines()}
                 for axis in figure.axes]
        plt.close(figure)
        return lines

    for panel, score in zip(drawn(tiny_run), tiny_run["scores"].values()):
        assert panel == {
            "Monte Carlo: 95th percentile": score["thresholds"]["monte_carlo"]["value"],
            "early generator: 95th percentile":
                score["thresholds"]["early_generator"]["value"]}

    # A run without an early generator (or one saved before it existed) draws only one line.
    without_early = copy.deepcopy(tiny_run)
    for score in without_early["scores"].values():
        del score["early_generated"]
    assert [list(panel) for panel in drawn(without_early)] == [
        ["Monte Carlo: 95th percentile"]] * len(tiny_run["scores"])
