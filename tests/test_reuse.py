"""Reusing a trained run: score hand-made and real images without retraining."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import gma, run_tiny


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_npz):
    """Return the results of a small run trained long enough to draw dark-background digits:
    after TINY_FLAGS' two epochs the generator still paints every pixel grey, and uniform
    noise lies closer to grey than real digits do."""
    return run_tiny(["--data-path", mnist_npz, "--output-dir",
                     str(tmp_path_factory.mktemp("trained")), "--epochs", "40",
                     "--batch-size", "32", "--learning-rate", "0.001",
                     "--generator-widths", "64", "--discriminator-widths", "64"])


@pytest.fixture(scope="module")
def hand_made_images(digits):
    """Return (images uint8, names): blanks, uniform noise and real test digits 0 and 1."""
    _, _, x_test, y_test = digits
    rng = np.random.default_rng(0)
    zeros_and_ones = np.concatenate([x_test[y_test == 0][:10], x_test[y_test == 1][:10]])
    noise = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    blank = np.zeros((2, 28, 28), np.uint8)
    names = ([f"real_{i}" for i in range(20)] + [f"noise_{i}" for i in range(5)]
             + ["blank_0", "blank_1"])
    return np.concatenate([zeros_and_ones, noise, blank]), names


def read_csv(run_dir):
    with open(os.path.join(run_dir, "scores.csv"), newline="") as file:
        return list(csv.DictReader(file))


def score(flags):
    """Run main() with flags; return (exit code, the newest scoring run's results)."""
    code = gma.main(flags)
    if code != 0:
        return code, None
    output_dir = flags[flags.index("--output-dir") + 1]
    runs = [os.path.join(output_dir, r) for r in os.listdir(output_dir) if "scores_from" in r]
    with open(os.path.join(max(runs, key=os.path.getmtime), "results.json")) as file:
        return code, json.load(file)


def test_scoring_an_npy_writes_one_row_per_image_that_agrees_with_the_thresholds(
        trained_run, hand_made_images, tmp_path):
    images, names = hand_made_images
    path = tmp_path / "images.npy"
    np.save(path, images)
    code, results = score(["--load-run", trained_run["run_dir"], "--score-images", str(path),
                           "--output-dir", str(tmp_path / "out")])
    assert code == 0
    rows = read_csv(results["run_dir"])
    assert [row["image"] for row in rows] == [str(i) for i in range(len(images))]
    # Without FRESH_SAMPLE the loaded run's own thresholds classify.
    for name, threshold in results["thresholds"].items():
        assert threshold == trained_run["scores"][name]["thresholds"]["validation"]["value"]
        for row in rows:
            assert int(row[f"{name}_flagged"]) == (float(row[f"{name}_score"]) > threshold)
    assert sum(int(row["anomaly"]) for row in rows) == results["flagged"]
    assert results["flagged"] == results["flagged_by_score"]["nearest_generated"]
    # Uniform noise lies farther from every generated digit than any real digit does.
    distances = np.array([float(row["nearest_generated_score"]) for row in rows])
    assert distances[20:25].min() > distances[:20].max()
    assert all(row["anomaly"] == "1" for row in rows[20:25])
    assert os.path.isfile(os.path.join(results["run_dir"], "top_anomalies.png"))


def test_png_folder_keeps_file_names_and_resizes_with_a_warning(
        tiny_run, hand_made_images, tmp_path, caplog):
    images, names = hand_made_images
    folder = tmp_path / "pngs"
    folder.mkdir()
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(np.kron(images[0], np.ones((2, 2), np.uint8))).save(folder / "big.png")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="gan_mc_anomaly"):
        code, results = score(["--load-run", tiny_run["run_dir"], "--score-images",
                               str(folder), "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert "Resized 1 of 28 images to 28x28: big.png (56x56)" in caplog.text
    rows = {row["image"]: row for row in read_csv(results["run_dir"])}
    assert set(rows) == {f"{name}.png" for name in names} | {"big.png"}
    # The same image saved as PNG gets the same score as from the array.
    npy = tmp_path / "one.npy"
    np.save(npy, images[:1])
    _, from_array = score(["--load-run", tiny_run["run_dir"], "--score-images", str(npy),
                           "--output-dir", str(tmp_path / "out2")])
    array_rows = read_csv(from_array["run_dir"])
    assert float(array_rows[0]["nearest_generated_score"]) == pytest.approx(
        float(rows["real_0.png"]["nearest_generated_score"]), rel=1e-5)


def test_fresh_sample_sets_new_monte_carlo_thresholds(tiny_run, hand_made_images, tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, images=hand_made_images[0] / 255.0)  # floats 0-1 are accepted too
    code, results = score(["--load-run", tiny_run["run_dir"], "--score-images", str(path),
                           "--fresh-sample", "--seed", "99", "--mc-samples", "2000",
                           "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert results["threshold_from"] == "monte_carlo"
    assert results["monte_carlo_samples"] == {"nearest_generated": 1000, "discriminator": 2000}
    saved = tiny_run["scores"]["discriminator"]["thresholds"]["monte_carlo"]
    fresh = results["thresholds"]["discriminator"]
    assert fresh != saved["value"]
    assert 0.0 <= fresh <= 1.0


def test_a_run_saved_before_neighbour_blur_existed_is_scored_in_raw_pixels(
        mnist_npz, hand_made_images, tmp_path):
    """Runs written before the NEIGHBOUR_BLUR, PRECISION and EARLY_GENERATOR settings have
    no such keys in results.json; they compared raw pixels, trained in float32 and kept no
    early generator, so loading one must do the same and reproduce its saved Monte Carlo
    thresholds (a blurred redraw would not, and the run would be refused)."""
    old = run_tiny(["--data-path", mnist_npz, "--output-dir", str(tmp_path / "runs"),
                    "--neighbour-blur", "0", "--early-generator", "0"])
    results_path = os.path.join(old["run_dir"], "results.json")
    for name in ("NEIGHBOUR_BLUR", "PRECISION", "EARLY_GENERATOR"):
        del old["settings"][name]
    with open(results_path, "w", encoding="utf-8") as file:
        json.dump(old, file)
    path = tmp_path / "images.npy"
    np.save(path, hand_made_images[0])
    code, results = score(["--load-run", old["run_dir"], "--score-images", str(path),
                           "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert results["loaded_settings"]["NEIGHBOUR_BLUR"] == 0.0
    assert results["loaded_settings"]["PRECISION"] == "float32"
    assert results["loaded_settings"]["EARLY_GENERATOR"] == 0.0
    assert results["thresholds"]["nearest_generated"] == (
        old["scores"]["nearest_generated"]["thresholds"]["validation"]["value"])


def test_training_run_with_score_images_scores_them_after_training(
        mnist_npz, hand_made_images, tmp_path, caplog, monkeypatch):
    path = tmp_path / "images.npy"
    np.save(path, hand_made_images[0])
    reads = []
    original_loader = gma.load_images_to_score
    monkeypatch.setattr(gma, "load_images_to_score",
                        lambda p: reads.append(p) or original_loader(p))
    output_dir = tmp_path / "out"
    code = gma.main(["--data-path", mnist_npz, "--output-dir", str(output_dir),
                     "--score-images", str(path), "--normal-digits", "0", "--epochs", "1",
                     "--latent-dim", "8", "--generator-widths", "16",
                     "--discriminator-widths", "16", "--mc-samples", "1000",
                     "--neighbour-samples", "500", "--mc-batch-size", "500"])
    assert code == 0
    folders = sorted(os.listdir(output_dir))
    assert len(folders) == 2 and any("scores_from_" in f for f in folders)
    # The run just trained used every setting given: none of them was ignored.
    assert "ignored" not in caplog.text
    assert reads == [str(path)]  # read once, before training, and that copy is scored


# Each bad input fails with its own message.


def test_missing_run_folder(tmp_path):
    with pytest.raises(gma.SettingsError, match="LOAD_RUN = .*absent.*: no such folder"):
        gma.check_settings({**gma.default_settings(), "LOAD_RUN": str(tmp_path / "absent"),
                            "SCORE_IMAGES": str(tmp_path)})


def test_run_folder_without_images_to_score(tiny_run):
    with pytest.raises(gma.SettingsError, match="SCORE_IMAGES is None: expected the images"):
        gma.check_settings({**gma.default_settings(), "LOAD_RUN": tiny_run["run_dir"]})


def test_missing_images(tmp_path):
    with pytest.raises(gma.SettingsError, match="SCORE_IMAGES = .*: no such file or folder"):
        gma.check_settings({**gma.default_settings(),
                            "SCORE_IMAGES": str(tmp_path / "absent.npy")})


def test_images_of_an_unknown_file_type(tmp_path):
    path = tmp_path / "images.csv"
    path.write_text("1,2,3")
    with pytest.raises(gma.SettingsError, match="is neither .npz nor .npy"):
        gma.check_settings({**gma.default_settings(), "SCORE_IMAGES": str(path)})


def test_run_folder_missing_files(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    os.remove(copy / "models" / "generator.keras")
    with pytest.raises(gma.SettingsError, match=r"lacks \['models/generator.keras'\]"):
        gma.load_trained_run(str(copy))


def test_models_from_another_configuration(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    gma.build_generator(8, (48,)).save(copy / "models" / "generator.keras")
    with pytest.raises(gma.SettingsError, match=r"the generator layers is \(48, 784\) but the "
                                                r"run's settings say \(32, 784\)"):
        gma.load_trained_run(str(copy))


def test_fresh_sample_must_hold_the_loaded_runs_neighbours(tiny_run, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((2, 28, 28), np.uint8))
    settings = {**gma.default_settings(), "LOAD_RUN": tiny_run["run_dir"],
                "SCORE_IMAGES": str(path), "FRESH_SAMPLE": True, "MC_SAMPLES": 1000,
                "NEIGHBOUR_SAMPLES": 50_000, "OUTPUT_DIR": str(tmp_path / "out")}
    gma.check_settings(settings)  # a loaded run brings its own NEIGHBOUR_SAMPLES (1,000)
    with pytest.raises(gma.SettingsError, match="MC_SAMPLES = 500 is smaller than the loaded "
                                                "run's NEIGHBOUR_SAMPLES = 1000"):
        gma.score_with_run({**settings, "MC_SAMPLES": 500})


def test_models_of_the_right_shape_but_another_run(tiny_run, tmp_path, hand_made_images):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    gma.build_discriminator((32,)).save(copy / "models" / "discriminator.keras")  # untrained
    path = tmp_path / "images.npy"
    np.save(path, hand_made_images[0])
    settings = {**gma.default_settings(), "LOAD_RUN": str(copy), "SCORE_IMAGES": str(path),
                "OUTPUT_DIR": str(tmp_path / "out")}
    with pytest.raises(gma.SettingsError, match="the models do not belong to these results"):
        gma.score_with_run(settings)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 32, 32), np.uint8), r"has shape \(3, 32, 32\): expected \(n, 28, 28\)"),
    (np.full((3, 28, 28), 255.0), "holds floats from 255 to 255: expected 0-1"),
    (np.full((3, 28, 28), -4, np.int16), "holds integers from -4 to -4: expected 0-255"),
])
def test_bad_image_arrays(tmp_path, array, message):
    path = tmp_path / "images.npy"
    np.save(path, array)
    with pytest.raises(gma.DataError, match=message):
        gma.load_images_to_score(str(path))


def test_npz_with_several_unnamed_arrays(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, a=np.zeros((2, 28, 28)), b=np.zeros((2, 28, 28)))
    with pytest.raises(gma.DataError, match=r"holds \['a', 'b'\]: expected one array"):
        gma.load_images_to_score(str(path))


def test_empty_png_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(gma.DataError, match="holds no .png files"):
        gma.load_images_to_score(str(tmp_path))


def test_unreadable_png(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(gma.DataError, match="broken.png in .* is not a readable PNG"):
        gma.load_images_to_score(str(tmp_path))


def test_corrupt_results_json(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    (copy / "results.json").write_text("{ not json")
    with pytest.raises(gma.SettingsError, match="results.json cannot be read"):
        gma.load_trained_run(str(copy))


@pytest.mark.parametrize("name, value, message", [
    ("LATENT_DIM", "8", r"LATENT_DIM = '8' is not valid: expected an integer >= 1"),
    ("NEIGHBOURS", 0, r"NEIGHBOURS = 0 is not valid: expected an integer >= 1"),
    ("SCORES", ["nearest"], r"SCORES = \('nearest',\) is not valid"),
])
def test_a_hand_edited_setting_in_results_json_is_named(tiny_run, tmp_path, name, value,
                                                        message):
    """Before this check, a string LATENT_DIM was reported as models that do not match the
    settings, and a zero NEIGHBOURS or an unknown score name loaded without complaint."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    with open(copy / "results.json") as file:
        saved = json.load(file)
    saved["settings"][name] = value
    (copy / "results.json").write_text(json.dumps(saved))
    with pytest.raises(gma.SettingsError, match="its results.json records a setting this "
                                                "script cannot use. " + message):
        gma.load_trained_run(str(copy))


def test_a_results_json_without_the_monte_carlo_threshold_is_named(tiny_run, tmp_path):
    """Before this check, reusing such a run failed with a KeyError."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    with open(copy / "results.json") as file:
        saved = json.load(file)
    del saved["scores"]["discriminator"]["thresholds"]["monte_carlo"]
    (copy / "results.json").write_text(json.dumps(saved))
    with pytest.raises(gma.SettingsError, match="its results.json has no Monte Carlo threshold "
                                                "value for the discriminator score"):
        gma.load_trained_run(str(copy))


def test_corrupt_model_file(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    (copy / "models" / "generator.keras").write_bytes(b"garbage")
    with pytest.raises(gma.SettingsError, match="generator.keras cannot be loaded as a Keras "
                                                "model"):
        gma.load_trained_run(str(copy))


def test_settings_a_reused_run_overrides_are_named(tiny_run, tmp_path, caplog):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((2, 28, 28), np.uint8))
    with caplog.at_level("WARNING", logger="gan_mc_anomaly"):
        code, results = score(["--load-run", tiny_run["run_dir"], "--score-images", str(path),
                               "--percentile", "99", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert "values given here are ignored: PERCENTILE=99.0" in caplog.text
    assert results["ignored_settings"] == ["PERCENTILE"]


def test_a_reused_run_scores_in_the_batch_size_given_now(tiny_run, tmp_path, monkeypatch):
    # The batch size only bounds memory, so a run trained with batches of 1000 can be reused
    # on a smaller machine: its redrawn sample still matches its recorded thresholds.
    assert tiny_run["settings"]["MC_BATCH_SIZE"] == 1000
    batch_sizes = []
    sample = gma.monte_carlo_sample

    def recording_sample(generator, discriminator, count, batch_size, *args, **kwargs):
        batch_sizes.append(batch_size)
        return sample(generator, discriminator, count, batch_size, *args, **kwargs)

    logits = gma.discriminator_logits

    def recording_logits(discriminator, images, batch_size):
        batch_sizes.append(batch_size)
        return logits(discriminator, images, batch_size)

    monkeypatch.setattr(gma, "monte_carlo_sample", recording_sample)
    monkeypatch.setattr(gma, "discriminator_logits", recording_logits)
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((2, 28, 28), np.uint8))
    code, results = score(["--load-run", tiny_run["run_dir"], "--score-images", str(path),
                           "--mc-batch-size", "700", "--output-dir", str(tmp_path / "out")])
    # Success means the redrawn Monte Carlo thresholds matched the recorded ones: the run
    # refuses to score when they do not (test_models_of_the_right_shape_but_another_run).
    assert code == 0
    assert batch_sizes == [700, 700]  # the Monte Carlo sample, then the images' D scores
    assert results["ignored_settings"] == []


def old_noise_batches(seed, batch_size, latent_dim):
    """Yield latent vectors as the script drew them before its noise came in blocks: batch b
    from the seed (seed, b), whatever the batch size."""
    import tensorflow as tf

    batch = 0
    while True:
        yield tf.random.stateless_normal((batch_size, latent_dim),
                                         tf.constant([seed, batch], tf.int64))
        batch += 1


def run_saved_before_noise_blocks(tiny_run, tmp_path, monkeypatch, batch_size):
    """Return a copy of tiny_run as the script once wrote it with MC_BATCH_SIZE = batch_size:
    no noise block in results.json, and Monte Carlo thresholds of a sample drawn the old way."""
    copy = tmp_path / "old_run"
    shutil.copytree(tiny_run["run_dir"], copy)
    with open(copy / "results.json") as file:
        saved = json.load(file)
    saved.pop("monte_carlo_noise_block", None)
    saved["settings"]["MC_BATCH_SIZE"] = batch_size
    loaded, generator, discriminator = gma.load_trained_run(tiny_run["run_dir"])
    with monkeypatch.context() as patch:
        patch.setattr(gma, "noise_batches", old_noise_batches)
        old_thresholds, _, _, _ = gma.reference_thresholds(
            loaded, generator, discriminator,
            {**gma.default_settings(), "FRESH_SAMPLE": True, "MC_BATCH_SIZE": batch_size,
             "MC_SAMPLES": loaded["settings"]["MC_SAMPLES"], "SEED": loaded["settings"]["SEED"]})
    for name, value in old_thresholds.items():
        saved["scores"][name]["thresholds"]["monte_carlo"]["value"] = value
    (copy / "results.json").write_text(json.dumps(saved))
    return str(copy), old_thresholds


def reuse_settings(run_folder, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((2, 28, 28), np.uint8))
    return {**gma.default_settings(), "LOAD_RUN": run_folder, "SCORE_IMAGES": str(path),
            "OUTPUT_DIR": str(tmp_path / "out")}


def test_a_run_saved_before_noise_blocks_with_another_batch_size_needs_a_fresh_sample(
        tiny_run, tmp_path, monkeypatch):
    # The run drew 3,000 images in batches of 1,000 from (SEED, 0), (SEED, 1), (SEED, 2): not
    # the sample drawn now, so redrawing it used to blame the models.
    old_run, old_thresholds = run_saved_before_noise_blocks(tiny_run, tmp_path, monkeypatch,
                                                            1000)
    recorded = tiny_run["scores"]["discriminator"]["thresholds"]["monte_carlo"]["value"]
    assert old_thresholds["discriminator"] != pytest.approx(recorded, rel=1e-3)
    settings = reuse_settings(old_run, tmp_path)
    with pytest.raises(gma.SettingsError, match=r"saved by an earlier version of this script, "
                       r"with MC_BATCH_SIZE = 1000; .* --mc-batch-size given now does not "
                       r"change this; use --fresh-sample"):
        gma.score_with_run(settings)
    results = gma.score_with_run({**settings, "FRESH_SAMPLE": True, "MC_SAMPLES": 2000})
    assert results["threshold_from"] == "monte_carlo"


@pytest.mark.parametrize("batch_size", [gma.NOISE_BLOCK, 5000])
def test_a_run_saved_before_noise_blocks_in_one_batch_is_reused_as_it_was(
        tiny_run, tmp_path, monkeypatch, batch_size):
    # With batches of 5,000 or 10,000 the run's 3,000 images were one draw from (SEED, 0):
    # the first rows of block 0, so its sample is the one drawn now.
    old_run, old_thresholds = run_saved_before_noise_blocks(tiny_run, tmp_path, monkeypatch,
                                                            batch_size)
    for name, value in old_thresholds.items():
        assert value == pytest.approx(
            tiny_run["scores"][name]["thresholds"]["monte_carlo"]["value"], rel=1e-6)
    results = gma.score_with_run(reuse_settings(old_run, tmp_path))
    assert results["threshold_from"] == "validation"


def test_a_run_drawn_in_other_noise_blocks_is_named(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], copy)
    with open(copy / "results.json") as file:
        saved = json.load(file)
    assert saved["monte_carlo_noise_block"] == gma.NOISE_BLOCK  # every run records it
    saved["monte_carlo_noise_block"] = 4096
    (copy / "results.json").write_text(json.dumps(saved))
    with pytest.raises(gma.SettingsError, match="records monte_carlo_noise_block = 4096, but "
                                                "this script draws noise in blocks of 10000"):
        gma.score_with_run(reuse_settings(str(copy), tmp_path))


def test_which_old_samples_were_drawn_in_blocks():
    block = gma.NOISE_BLOCK
    assert gma.drawn_in_blocks(100_000, block)  # every batch was a block
    assert gma.drawn_in_blocks(25_000, block)  # the last batch too: its first rows are kept
    assert gma.drawn_in_blocks(3000, 5000) and gma.drawn_in_blocks(block, 2 * block)
    assert not gma.drawn_in_blocks(100_000, 1000)
    assert not gma.drawn_in_blocks(30_000, 50_000)  # one draw of 30,000 rows, not 3 blocks
    assert not gma.drawn_in_blocks(3000, 1000)


def test_a_single_image_with_a_channel_axis(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, np.zeros((28, 28, 1), np.uint8))
    images, names = gma.load_images_to_score(str(path))
    assert images.shape == (1, 28, 28) and names == ["0"]


def test_flat_images_are_reported_with_their_own_shape(tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.zeros((50, 784), np.uint8))
    with pytest.raises(gma.DataError, match=r"has shape \(50, 784\): expected \(n, 28, 28\)"):
        gma.load_images_to_score(str(path))


def test_one_image_is_counted_in_the_singular(tiny_run, hand_made_images, tmp_path, capsys,
                                               caplog):
    caplog.set_level("INFO", logger="gan_mc_anomaly")
    path = tmp_path / "one.npy"
    np.save(path, hand_made_images[0][:1])
    code, results = score(["--load-run", tiny_run["run_dir"], "--score-images", str(path),
                           "--output-dir", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Scored 1 image from" in printed
    assert "Scoring 1 image from" in caplog.text
    assert f"flags {results['flagged']} of 1 image (" in printed
    assert "1 images" not in printed


def test_each_score_line_carries_its_auroc_from_the_loaded_run(tiny_run, hand_made_images,
                                                                tmp_path, capsys):
    """A user reading the flags must see which score ranked anomalies worse than chance in
    the run's own test, as the discriminator score often does."""
    path = tmp_path / "images.npy"
    np.save(path, hand_made_images[0])
    code, _ = score(["--load-run", tiny_run["run_dir"], "--score-images", str(path),
                     "--output-dir", str(tmp_path / "out")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    for name in tiny_run["settings"]["SCORES"]:
        auroc = tiny_run["scores"][name]["auroc"]
        line = next(x for x in lines if x.startswith(f"  {name} "))
        assert f"AUROC {auroc:.3f} on the loaded run's test images" in line
        assert ("worse than chance" in line) == (auroc < 0.5)
