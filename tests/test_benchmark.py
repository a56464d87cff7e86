"""The one-class benchmark: a short real run on two digits with tiny settings."""

import json
import os
import sys

import numpy as np
import pytest

from conftest import TINY_FLAGS, gma, run_tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import correction  # noqa: E402
import latent_search  # noqa: E402
import one_class  # noqa: E402
import other_generators  # noqa: E402
import score_variants  # noqa: E402


def tiny_flags_without_digits():
    flags = list(TINY_FLAGS)
    del flags[flags.index("--normal-digits"):flags.index("--normal-digits") + 3]
    return flags


def test_short_benchmark_writes_a_table_with_every_digit_and_score(tmp_path, mnist_npz,
                                                                   monkeypatch):
    flags = tiny_flags_without_digits()
    output = tmp_path / "bench"
    assert one_class.main(["--data-path", mnist_npz, "--digits", "2", "7", "--output",
                           str(output)] + flags) == 0

    with open(output / "one_class.json") as file:
        table = json.load(file)
    assert list(table["digits"]) == ["2", "7"]
    sources = ("validation", "monte_carlo", "corrected", "early_generator")
    expected_keys = {
        "nearest_generated": {"auroc"} | {f"{s}_{r}" for s in sources
                                          for r in ("false_alarm", "detection")},
        "discriminator": {"auroc"} | {f"{s}_{r}" for s in sources if s != "corrected"
                                      for r in ("false_alarm", "detection")},
        "nearest_training": {"auroc", "validation_false_alarm", "validation_detection"}}
    for row in table["digits"].values():
        assert set(row) == set(expected_keys)
        for name, values in row.items():
            assert set(values) == expected_keys[name]
            assert all(0.0 <= value <= 1.0 for value in values.values())
        # A higher threshold flags fewer images: the corrected threshold (x 1.375) flags at
        # most what the Monte Carlo one flags.
        ours = row["nearest_generated"]
        for rate in ("false_alarm", "detection"):
            assert ours[f"corrected_{rate}"] <= ours[f"monte_carlo_{rate}"]
    # The baseline needs no GAN; on real digits it ranks far better than chance.
    assert all(row["nearest_training"]["auroc"] > 0.7 for row in table["digits"].values())
    for name, means in table["mean"].items():
        assert set(means) == expected_keys[name]
        for key, value in means.items():
            assert value == pytest.approx(np.mean([table["digits"][d][name][key]
                                                   for d in ("2", "7")]))

    markdown = (output / "one_class.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 3 + 3  # header, 2 digits x 3 scores, 3 means
    for name, means in table["mean"].items():
        cells = [("-" if key not in means else f"{means[key]:.3f}" if key == "auroc"
                  else f"{means[key]:.1%}") for key, _ in one_class.COLUMNS]
        assert f"| **mean** | {name} | " + " | ".join(cells) + " |" in rows

    # The corrected threshold is the Monte Carlo one times MC_CORRECTION, and the runs'
    # results.json record both.
    run_folders = sorted((output / "runs").iterdir())
    for folder in run_folders:
        with open(folder / "results.json") as file:
            found = json.load(file)["scores"]
        ours = found["nearest_generated"]["thresholds"]
        assert ours["corrected"]["value"] == pytest.approx(
            gma.MC_CORRECTION * ours["monte_carlo"]["value"])
        assert "corrected" not in found["discriminator"]["thresholds"]

    # correction.py reloads the runs: each gap is the held-out threshold over the Monte Carlo
    # one, and the factor it picks is the candidate whose mean held-out share is nearest 5%.
    assert correction.main(["--data-path", mnist_npz, "--runs", str(output / "runs"),
                            "--output", str(output)]) == 0
    with open(output / "correction.json") as file:
        measured = json.load(file)
    assert sorted(measured["digits"]) == ["2", "7"]
    for folder, (digit, numbers) in zip(run_folders, sorted(measured["digits"].items())):
        with open(folder / "results.json") as file:
            recorded = json.load(file)["scores"]["nearest_generated"]["thresholds"]
        assert numbers["monte_carlo_threshold"] == pytest.approx(
            recorded["monte_carlo"]["value"], rel=1e-5)
        assert numbers["held_out_threshold"] == pytest.approx(
            recorded["validation"]["value"], rel=1e-5)
        assert numbers["gap"] == pytest.approx(
            numbers["held_out_threshold"] / numbers["monte_carlo_threshold"])
        shares = [numbers["held_out_share"][f"{c:.3f}"] for c in correction.FACTORS]
        assert shares == sorted(shares, reverse=True)  # a larger factor flags fewer
    means = {c: np.mean([n["held_out_share"][f"{c:.3f}"] for n in measured["digits"].values()])
             for c in correction.FACTORS}
    best = min(abs(m - 0.05) for m in means.values())
    assert abs(means[measured["factor"]] - 0.05) == pytest.approx(best)
    assert measured["mean_held_out_share"] == pytest.approx(means[measured["factor"]])

    # The latent search reloads the same runs; shortened, it still fills every cell.
    monkeypatch.setattr(latent_search, "STEPS", 10)
    monkeypatch.setattr(latent_search, "TEST_IMAGES", 300)
    monkeypatch.setattr(latent_search, "GENERATED_IMAGES", 200)
    assert latent_search.main(["--data-path", mnist_npz, "--runs", str(output / "runs"),
                               "--output", str(output)]) == 0
    with open(output / "latent_search.json") as file:
        searched = json.load(file)
    assert sorted(searched["digits"]) == ["2", "7"] and searched["test_images"] == 300
    for numbers in searched["digits"].values():
        assert set(numbers) == {"nearest_generated_auroc", "raw", "blurred"}
        for variant in ("raw", "blurred"):
            assert set(numbers[variant]) == {"test_auroc", "monte_carlo_false_alarm",
                                             "validation_false_alarm"}
            assert all(0.0 <= value <= 1.0 for value in numbers[variant].values())
    assert len([line for line in (output / "latent_search.md").read_text().splitlines()
                if line.startswith("| ")]) == 1 + 2 + 1  # header, 2 digits, the mean

    # The score variants reload the same runs; the script's own variant must reproduce the
    # benchmark's nearest_generated AUROC exactly.
    assert score_variants.main(["--data-path", mnist_npz, "--runs", str(output / "runs"),
                                "--output", str(output)]) == 0
    with open(output / "score_variants.json") as file:
        variants = json.load(file)
    assert list(variants["digits"]) == ["2", "7"]
    own = f"nearest, blur {gma.NEIGHBOUR_BLUR:g}"
    for digit, found in variants["digits"].items():
        assert len(found) == len(score_variants.BLURS) + len(score_variants.COMPONENTS) + 2
        assert found[own]["test_auroc"] == pytest.approx(
            table["digits"][digit]["nearest_generated"]["auroc"], abs=1e-9)
        for values in found.values():
            assert all(0.0 <= value <= 1.0 for value in values.values())


def test_latent_search_keeps_an_exact_start_and_closes_in_from_a_wrong_one():
    import tensorflow as tf

    generator = gma.build_generator(8, (16,))
    true_noise = tf.random.stateless_normal((20, 8), seed=[1, 2]).numpy()
    images = gma.to_images(generator(true_noise).numpy()).reshape(20, -1)
    start_raw = np.linalg.norm(gma.to_images(generator(np.zeros_like(true_noise)).numpy())
                               .reshape(20, -1) - images, axis=1)
    exact, _ = latent_search.search_residuals(generator, images, true_noise, 20, 0.02, 1.0)
    assert np.all(exact < 0.05)  # Adam's first steps barely leave an exact optimum
    searched, blurred = latent_search.search_residuals(generator, images,
                                                       np.zeros_like(true_noise), 200, 0.05,
                                                       1.0)
    assert np.all(searched < 0.5 * start_raw)
    assert np.all(blurred <= searched + 1e-6)  # a blur never lengthens a difference


def test_latest_runs_keeps_the_newest_run_of_each_digit_and_refuses_mixed_settings(
        tmp_path, capsys):
    import argparse

    import tables

    def fake_run(name, digit, seed):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"settings": {"NORMAL_DIGITS": [digit], "SEED": seed, "OUTPUT_DIR": name}}))

    fake_run("20261205-010000_normal3_seed42", 3, 42)
    fake_run("20261205-020000_normal5_seed42", 5, 42)
    fake_run("20261205-030000_normal3_seed42", 3, 42)
    (tmp_path / "20261205-040000_unfinished").mkdir()  # no results.json: skipped
    parser = argparse.ArgumentParser()
    assert tables.latest_runs(str(tmp_path), parser) == [
        str(tmp_path / "20261205-020000_normal5_seed42"),
        str(tmp_path / "20261205-030000_normal3_seed42")]
    fake_run("20261205-050000_normal5_seed43", 5, 43)
    with pytest.raises(SystemExit):
        tables.latest_runs(str(tmp_path), parser)
    assert "differ in ['SEED']" in capsys.readouterr().err


def test_benchmark_refuses_runs_without_held_out_images(tmp_path, mnist_npz):
    with pytest.raises(SystemExit):
        one_class.main(["--data-path", mnist_npz, "--output", str(tmp_path),
                        "--validation-fraction", "0", "--classify-with", "monte_carlo"])


def test_weighted_percentile_with_equal_and_uneven_weights():
    values = np.arange(1.0, 101.0)  # 1..100
    assert score_variants.weighted_percentile(values, np.ones(100), 95) == 95.0
    # All the weight on the ten largest values: the 95th percentile falls among them.
    weights = np.r_[np.zeros(90), np.ones(10)]
    assert score_variants.weighted_percentile(values, weights, 95) == 100.0
    assert score_variants.weighted_percentile(values, weights, 50) == 95.0


def test_kernel_density_scores_a_copy_lowest_and_never_counts_a_sample_itself():
    rng = np.random.default_rng(0)
    reference = rng.uniform(size=(30, 784)).astype(np.float32)
    queries = np.stack([reference[4], reference[4] + 0.1, rng.uniform(size=784)])
    scores = score_variants.kernel_density_scores(queries, reference, bandwidth=3.0)
    assert scores[0] < scores[1] < scores[2]
    # With itself excluded, a sample's density comes from the other 29 only.
    loo = score_variants.kernel_density_scores(reference, reference, 3.0,
                                               self_indices=np.arange(30), block_rows=7)
    squared = ((reference[:, None] - reference[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    expected = np.log(30) - np.log(np.exp(-squared / 18.0).sum(axis=1))
    np.testing.assert_allclose(loo, expected, rtol=1e-4)


def test_other_generators_benchmark_trains_the_scripts_own_gan(tmp_path, mnist_npz):
    flags = tiny_flags_without_digits() + ["--epochs", "4"]
    output = tmp_path / "bench"
    assert other_generators.main(["--data-path", mnist_npz, "--digits", "7", "--fractions",
                                  "0.5", "--output", str(output)] + flags) == 0

    with open(output / "other_generators.json") as file:
        table = json.load(file)
    assert list(table["digits"]) == ["7"]
    row = table["digits"]["7"]
    # The snapshot at half of 4 epochs, from both GANs, and the second GAN's last epoch.
    assert list(row["thresholds"]) == [
        other_generators.OWN, "this GAN, epoch 2", "second GAN, epoch 2",
        "second GAN, epoch 4", other_generators.HELD_OUT]
    for found in row["thresholds"].values():
        assert 0.0 <= found["false_alarm"] <= 1.0 and 0.0 <= found["detection"] <= 1.0
    markdown = (output / "other_generators.md").read_text()
    assert "| second GAN, epoch 4 | " in markdown

    # The script itself, run with the same settings, must give the same network, hence the
    # same AUROC and the same Monte Carlo and held-out thresholds.
    script = run_tiny(["--normal-digits", "7", "--data-path", mnist_npz, "--epochs", "4",
                       "--output-dir", str(tmp_path / "runs")])
    own = script["scores"]["nearest_generated"]
    assert row["auroc"] == pytest.approx(own["auroc"], abs=1e-12)
    assert row["thresholds"][other_generators.OWN]["threshold"] == pytest.approx(
        own["thresholds"]["monte_carlo"]["value"], rel=1e-9)
    assert row["thresholds"][other_generators.HELD_OUT]["threshold"] == pytest.approx(
        own["thresholds"]["validation"]["value"], rel=1e-9)


def test_other_generators_without_a_second_gan_scores_only_the_scripts_snapshots(tmp_path,
                                                                              mnist_npz):
    output = tmp_path / "bench"
    assert other_generators.main(["--data-path", mnist_npz, "--digits", "3", "--fractions",
                                  "0.25", "0.5", "--no-second-gan", "--output", str(output)]
                                 + tiny_flags_without_digits() + ["--epochs", "4"]) == 0

    with open(output / "other_generators.json") as file:
        table = json.load(file)
    assert table["second_gan"] is False
    assert list(table["digits"]["3"]["thresholds"]) == [
        other_generators.OWN, "this GAN, epoch 1", "this GAN, epoch 2",
        other_generators.HELD_OUT]
    assert "no second GAN." in (output / "other_generators.md").read_text()


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_other_generators_refuses_a_snapshot_outside_training(tmp_path, mnist_npz, fraction,
                                                             capsys):
    with pytest.raises(SystemExit):
        other_generators.main(["--data-path", mnist_npz, "--fractions", fraction,
                               "--output", str(tmp_path)])
    assert "each must be in (0, 1]" in capsys.readouterr().err
