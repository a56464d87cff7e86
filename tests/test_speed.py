"""The speed benchmark's arithmetic: FLOP counts checked by hand on small networks."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import speed  # noqa: E402


def test_training_step_flops_by_hand():
    settings = {"LATENT_DIM": 2, "GENERATOR_WIDTHS": (3,), "DISCRIMINATOR_WIDTHS": (5,)}
    # With 784 pixels: G layers 2x3 and 3x784, D layers 784x5 and 5x1; batch 1, 2 FLOP/weight.
    g1, g2, d1, d2 = 2 * 2 * 3, 2 * 3 * 784, 2 * 784 * 5, 2 * 5 * 1
    f_g, f_d = g1 + g2, d1 + d2
    d_update = f_g + 2 * (3 * f_d - d1)  # G forward; D forward + both gradients, twice
    g_update = 3 * f_g - g1 + 2 * f_d  # G, D forward; D input gradients; G gradients
    assert speed.training_step_flops(settings, batch=1) == d_update + g_update
    assert speed.training_step_flops(settings, batch=128) == 128 * (d_update + g_update)


def test_default_step_is_about_one_and_a_half_gflop():
    import gan_mc_anomaly as gma

    flops = speed.training_step_flops(gma.default_settings(), batch=128)
    assert flops == pytest.approx(1.54e9, rel=0.01)


def test_scoring_flops_per_image_is_one_forward_pass_of_each_network():
    settings = {"LATENT_DIM": 2, "GENERATOR_WIDTHS": (3,), "DISCRIMINATOR_WIDTHS": (5,)}
    assert speed.scoring_flops_per_image(settings) == 2 * (2 * 3 + 3 * 784 + 784 * 5 + 5)


def test_timed_rate_counts_units_per_second():
    import time

    # Each call takes at least 10 ms and counts 7 units: at most 700 units a second.
    rate = speed.timed_rate(lambda: time.sleep(0.01), units_per_run=7, seconds=0.3)
    assert 100 < rate <= 700  # the lower bound leaves room for a busy machine


def test_neighbour_flops_are_one_dot_product_per_kept_generated_image():
    assert speed.neighbour_flops_per_image({"NEIGHBOUR_SAMPLES": 20_000}) == 2 * 784 * 20_000


def test_neighbour_scoring_rate_scores_real_images():
    import gan_mc_anomaly as gma

    settings = {**gma.default_settings(), "NEIGHBOUR_SAMPLES": 500}
    rate = speed.neighbour_scoring_rate(settings, seconds=0.2)
    assert rate > 1000  # 10,000 images against 500 neighbours take well under 10 s


def test_training_step_really_compiles_with_xla_while_runs_are_reproducible(recwarn):
    # Keras drops compile(jit_compile=True), with only a UserWarning, while TensorFlow's op
    # determinism is on, as it is in every run; the GAN compiles its own step.
    import numpy as np
    import tensorflow as tf

    import gan_mc_anomaly as gma

    gma.make_reproducible(0)
    settings = gma.parse_args(["--latent-dim", "4", "--generator-widths", "8",
                               "--discriminator-widths", "8"])
    images = np.random.default_rng(0).uniform(-1, 1, (64, gma.IMAGE_PIXELS)).astype(np.float32)
    gan = gma.build_gan(settings, steps_per_execution=2, jit_compile=True)
    gan.fit(gma.training_dataset(images, 16, 0), epochs=1, verbose=0, shuffle=False)

    assert not [w for w in recwarn if "jit_compile" in str(w.message)]
    hlo = gan.one_step.experimental_get_compiler_ir(tf.constant(images[:16]))(stage="hlo")
    assert "adversarial_step" in hlo and "dot(" in hlo
    assert gma.USE_XLA and gma.STEPS_PER_CALL > 1  # the measured defaults (benchmarks/speed.py)


def test_xla_is_turned_off_with_a_warning_only_on_a_mac_that_has_a_gpu(monkeypatch, caplog):
    import tensorflow as tf

    import gan_mc_anomaly as gma

    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["a GPU"] if kind == "GPU" else [])
    monkeypatch.setattr(gma.platform, "system", lambda: "Linux")
    assert gma.xla_for_training(True) is True
    assert gma.xla_for_training(False) is False
    monkeypatch.setattr(gma.platform, "system", lambda: "Darwin")
    assert gma.xla_for_training(False) is False
    assert not caplog.records
    assert gma.xla_for_training(True) is False
    assert "XLA does not run on Apple GPUs" in caplog.text
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert gma.xla_for_training(True) is True  # a Mac without a GPU trains on its CPU


def test_rates_measured_in_rounds_report_median_lowest_and_highest():
    assert speed.spread([30.0, 10.0, 20.0]) == {"median": 20.0, "low": 10.0, "high": 30.0}
    assert speed.spread([5.0, 7.0]) == {"median": 6.0, "low": 5.0, "high": 7.0}


def test_step_products_run_at_a_positive_finite_rate():
    import gan_mc_anomaly as gma

    settings = gma.parse_args(["--latent-dim", "4", "--generator-widths", "8",
                               "--discriminator-widths", "8"])
    rate = speed.step_products_rate(settings, 16, 0.2)
    assert 0 < rate < float("inf")


def test_scoring_products_run_at_a_positive_finite_rate():
    import gan_mc_anomaly as gma

    settings = gma.parse_args(["--latent-dim", "4", "--generator-widths", "8",
                               "--discriminator-widths", "8"])
    rate = speed.scoring_products_rate(settings, 256, 0.2)
    assert 0 < rate < float("inf")


def test_the_whole_benchmark_runs_and_its_shares_follow_from_its_rates(tmp_path):
    # About two minutes on two cores: every rate measured twice, briefly, on the default
    # networks. Each round's shares must come from that round's own matmul rate, and each
    # summary from the rounds.
    import json

    import gan_mc_anomaly as gma

    assert speed.main(["--seconds", "0.05", "--rounds", "2", "--output", str(tmp_path)]) == 0
    with open(tmp_path / "speed.json") as file:
        results = json.load(file)
    text = (tmp_path / "speed.txt").read_text()
    rounds = results["rounds"]
    assert len(rounds) == 2
    settings = gma.default_settings()
    per_image = speed.scoring_flops_per_image(settings)
    step_flops = results["training_step_gflop"] * 1e9
    for found in rounds:
        peak = found["matmul_gflops"] * 1e9
        assert found["step_products_share"] == pytest.approx(
            found["step_products_gflops"] * 1e9 / peak)
        assert found["mc_products_share"] == pytest.approx(
            found["mc_products_gflops"] * 1e9 / peak)
        for name in results["compiled"]:
            row = found[name]
            assert row["share_of_matmul_rate"] == pytest.approx(
                row["steps_per_s"] * step_flops / peak)
            assert row["times_usual_loop"] == pytest.approx(
                row["steps_per_s"] / found["usual_loop_steps_per_s"])
            assert row["epochs_timed"] >= 2
        for batch in speed.MC_BATCHES:
            row = found[f"mc_batch_{batch}"]
            assert row["share_of_matmul_rate"] == pytest.approx(
                row["images_per_s"] * per_image / peak)
        default_batch = found[f"mc_batch_{settings['MC_BATCH_SIZE']}"]["images_per_s"]
        assert found["mc_noise_share_of_batch_time"] == pytest.approx(
            found["mc_noise_draw_s"] * default_batch / settings["MC_BATCH_SIZE"])
        assert found["nearest_generated_share_of_matmul_rate"] == pytest.approx(
            found["nearest_generated_images_per_s"] * speed.neighbour_flops_per_image(settings)
            / peak)

    def summary_of(values):
        return {"median": pytest.approx(sum(values) / 2), "low": min(values),
                "high": max(values)}

    for key in ("matmul_gflops", "step_products_share", "usual_loop_steps_per_s",
                "mc_products_share", "mc_noise_share_of_batch_time",
                "nearest_generated_images_per_s", "nearest_generated_share_of_matmul_rate"):
        assert results[key] == summary_of([r[key] for r in rounds]), key
    for name, summary in results["compiled"].items():
        for key, values in summary.items():
            assert values == summary_of([r[name][key] for r in rounds]), (name, key)
    for batch in speed.MC_BATCHES:
        for key, values in results["monte_carlo"][f"batch {batch}"].items():
            assert values == summary_of([r[f"mc_batch_{batch}"][key] for r in rounds])
        assert f"Monte Carlo scoring, batch {batch:<8,}" in text
    assert "tf.data autotune" in text and "<- script default" in text
    # Only one batch of images exists at a time, whatever the sample's size.
    assert results["memory_ratio"] <= 1.2


def test_training_pipeline_turns_tf_data_autotuning_off_and_keeps_the_same_batches():
    # With autotuning about a third of the default run's epochs took almost twice as long
    # (its training_log.csv); turning it off must not change what the GAN trains on.
    import numpy as np

    import gan_mc_anomaly as gma

    images = np.random.default_rng(0).uniform(-1, 1, (300, gma.IMAGE_PIXELS)).astype(
        np.float32)
    plain = gma.training_dataset(images, 32, seed=5)
    tuned = gma.training_dataset(images, 32, seed=5, autotune=True)
    assert plain.options().autotune.enabled is False
    assert tuned.options().autotune.enabled is not False
    epochs = []
    for _ in range(2):  # every pass reshuffles, in the same way in both pipelines
        batches = np.stack([batch.numpy() for batch in plain])
        np.testing.assert_array_equal(batches, np.stack([batch.numpy() for batch in tuned]))
        assert batches.shape == (300 // 32, 32, gma.IMAGE_PIXELS)
        epochs.append(batches)
    assert not np.array_equal(epochs[0], epochs[1])
