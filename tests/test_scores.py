"""The anomaly score is 1 - D(x): it rises as the discriminator's belief in an image falls."""

import numpy as np
import pytest

from conftest import gma


def test_score_equals_one_minus_sigmoid_of_the_logit():
    logits = np.array([-5.0, -1.0, 0.0, 0.5, 3.0])
    expected = 1.0 - 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(gma.anomaly_scores_from_logits(logits), expected, rtol=1e-12)


def test_lower_discriminator_output_never_gets_a_lower_score():
    logits = np.random.default_rng(0).normal(scale=20.0, size=10_000)
    order = np.argsort(logits)
    scores = gma.anomaly_scores_from_logits(logits)[order]
    assert np.all(np.diff(scores) <= 0)


def test_confident_real_images_keep_distinct_scores():
    # In float32, 1 - D(x) is exactly 0 for all of these; the score must still rank them.
    logits = np.array([20.0, 25.0, 30.0, 35.0])
    scores = gma.anomaly_scores_from_logits(logits)
    assert np.all(scores > 0)
    assert np.all(np.diff(scores) < 0)


def test_test_image_with_lower_d_gets_higher_score_through_the_real_discriminator():
    import keras

    discriminator = gma.build_discriminator((16,))
    images = np.random.default_rng(1).uniform(size=(64, 28, 28)).astype(np.float32)
    logits = gma.discriminator_logits(discriminator, images, batch_size=16)
    d_of_x = np.asarray(keras.ops.sigmoid(logits))
    scores = gma.anomaly_scores_from_logits(logits)
    assert scores == pytest.approx(1.0 - d_of_x, abs=1e-6)
    lower_d, higher_d = np.argmin(d_of_x), np.argmax(d_of_x)
    assert scores[lower_d] > scores[higher_d]


def test_monte_carlo_sample_is_reproducible_and_keeps_only_the_images_asked_for():
    generator = gma.build_generator(8, (16,))
    discriminator = gma.build_discriminator((16,))
    logits, images = gma.monte_carlo_sample(generator, discriminator, 1000, 300, 8, seed=3,
                                            keep_images=450)
    again, _ = gma.monte_carlo_sample(generator, discriminator, 1000, 300, 8, seed=3)
    other_seed, _ = gma.monte_carlo_sample(generator, discriminator, 1000, 300, 8, seed=4)
    np.testing.assert_array_equal(logits, again)
    assert not np.array_equal(logits, other_seed)
    assert logits.shape == (1000,) and np.all(np.isfinite(logits))
    assert images.shape == (450, 784) and images.min() >= 0 and images.max() <= 1
    # The kept images are the ones that were scored: D of them gives the same logits.
    np.testing.assert_allclose(gma.discriminator_logits(discriminator,
                                                        images.reshape(-1, 28, 28), 450),
                               logits[:450], rtol=1e-4, atol=1e-4)
    # A shorter sample is the start of a longer one with the same seed and batch size.
    shorter, _ = gma.monte_carlo_sample(generator, discriminator, 600, 300, 8, seed=3)
    np.testing.assert_array_equal(shorter, logits[:600])


def test_monte_carlo_sample_does_not_depend_on_the_batch_size(monkeypatch):
    import tensorflow as tf

    # Small noise blocks, so that 1000 images span four of them and batches straddle them.
    monkeypatch.setattr(gma, "NOISE_BLOCK", 256)
    generator = gma.build_generator(8, (16,))
    discriminator = gma.build_discriminator((16,))
    blocks = [tf.random.stateless_normal((256, 8), tf.constant([3, k], tf.int64))
              for k in range(4)]
    noise = tf.concat(blocks, 0)[:1000]
    expected = discriminator(generator(noise))[:, 0].numpy()
    expected_images = (generator(noise).numpy() + 1) / 2
    for batch_size in (1000, 300, 256, 64, 7, 5000):
        logits, images = gma.monte_carlo_sample(generator, discriminator, 1000, batch_size, 8,
                                                seed=3, keep_images=700)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"batch size {batch_size}")
        np.testing.assert_allclose(images, expected_images[:700], rtol=1e-5, atol=1e-6,
                                   err_msg=f"batch size {batch_size}")


def test_monte_carlo_noise_blocks_are_the_seeds_draws_at_the_default_batch_size():
    # At MC_BATCH_SIZE = NOISE_BLOCK batch b is exactly the draw from (seed, b), as it was
    # before the noise came in blocks, so runs recorded then redraw the same thresholds.
    import tensorflow as tf

    assert gma.NOISE_BLOCK == gma.MC_BATCH_SIZE
    batches = gma.noise_batches(7, gma.NOISE_BLOCK, 4)
    for block in range(2):
        draw = tf.random.stateless_normal((gma.NOISE_BLOCK, 4), tf.constant([7, block],
                                                                           tf.int64))
        np.testing.assert_array_equal(next(batches).numpy(), draw.numpy())


def test_monte_carlo_sample_refuses_to_keep_more_images_than_it_draws():
    generator = gma.build_generator(8, (16,))
    discriminator = gma.build_discriminator((16,))
    with pytest.raises(ValueError, match="keep_images = 200 must be between 0 and the 100"):
        gma.monte_carlo_sample(generator, discriminator, 100, 50, 8, seed=0, keep_images=200)


def brute_force_distances(queries, reference, neighbours, skip_self=False):
    distances = np.sqrt(((queries[:, None, :] - reference[None, :, :]) ** 2).sum(-1))
    if skip_self:
        np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, :neighbours].mean(axis=1)


def test_an_image_equal_to_a_generated_one_scores_lowest():
    rng = np.random.default_rng(0)
    reference = rng.uniform(size=(50, 784)).astype(np.float32)
    queries = np.stack([reference[17], reference[17] + 0.05, rng.uniform(size=784)])
    scores = gma.nearest_generated_distances(queries, reference, neighbours=1)
    assert scores[0] == pytest.approx(0.0, abs=0.05)  # float32 cancellation, see below
    assert scores[0] < scores[1] < scores[2]
    assert scores[1] == pytest.approx(0.05 * np.sqrt(784), rel=1e-3)


def test_a_far_image_scores_higher_than_a_near_one():
    reference = np.zeros((20, 784), np.float32)
    reference[:, :10] = np.random.default_rng(1).uniform(size=(20, 10))
    near = np.zeros(784, np.float32)
    far = np.ones(784, np.float32)
    near_score, far_score = gma.nearest_generated_distances(np.stack([near, far]), reference, 3)
    assert near_score < far_score


def test_scores_match_brute_force_in_any_block_size():
    rng = np.random.default_rng(2)
    reference = rng.uniform(size=(40, 784)).astype(np.float32)
    queries = rng.uniform(size=(23, 784)).astype(np.float32)
    expected = brute_force_distances(queries, reference, 4)
    for block_rows in (1, 5, 23, None):
        scores = gma.nearest_generated_distances(queries, reference, 4, block_rows=block_rows)
        np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_leave_one_out_never_counts_a_sample_as_its_own_neighbour():
    rng = np.random.default_rng(3)
    reference = rng.uniform(size=(30, 784)).astype(np.float32)
    scores = gma.nearest_generated_distances(reference, reference, 2,
                                             self_indices=np.arange(30), block_rows=7)
    assert np.all(scores > 1.0)  # random points in [0, 1]^784 lie about 11 apart
    np.testing.assert_allclose(scores, brute_force_distances(reference, reference, 2,
                                                             skip_self=True), rtol=1e-4)
    # Without skipping, each sample's nearest neighbour would be itself, at distance 0 (up to
    # float32 cancellation in |q|^2 + |g|^2 - 2 q.g, a few hundredths here).
    with_self = gma.nearest_generated_distances(reference, reference, 1)
    assert np.all(with_self < 0.05)


def test_default_blocks_keep_each_distance_matrix_within_64_mib(monkeypatch):
    rng = np.random.default_rng(4)
    reference = rng.uniform(size=(5000, 784)).astype(np.float32)
    queries = rng.uniform(size=(7000, 784)).astype(np.float32)
    gma.nearest_generated_distances(queries[:1], reference, 1)  # compiles the block scorer
    block_sizes = []
    compiled = gma._block_scorer

    def recording_scorer(query_block, *rest):
        block_sizes.append(len(query_block))
        return compiled(query_block, *rest)

    monkeypatch.setattr(gma, "_block_scorer", recording_scorer)
    scores = gma.nearest_generated_distances(queries, reference, 1)
    assert len(scores) == 7000 and sum(block_sizes) == 7000
    assert len(block_sizes) == 3  # 3,355 queries a block for 5,000 references
    assert max(block_sizes) * len(reference) * 4 <= 64 * 2 ** 20


def test_blur_zero_leaves_the_pixels_as_they_are():
    images = np.random.default_rng(5).uniform(size=(3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(gma.blur(images, 0.0), images.reshape(3, 784))


def test_blur_spreads_a_point_into_a_gaussian_of_the_given_width():
    point = np.zeros((1, 28, 28), np.float32)
    point[0, 14, 14] = 1.0
    for sigma in (1.0, 2.0):
        blurred = gma.blur(point, sigma).reshape(28, 28)
        assert blurred.sum() == pytest.approx(1.0, abs=1e-4)  # far from the border: no loss
        # A 2-D Gaussian's peak is 1 / (2 pi sigma^2); sampling at whole pixels adds a little.
        assert blurred[14, 14] == pytest.approx(1 / (2 * np.pi * sigma ** 2), rel=0.05)
        rows, cols = np.indices((28, 28))
        spread = (blurred * ((rows - 14) ** 2 + (cols - 14) ** 2)).sum() / 2
        assert spread == pytest.approx(sigma ** 2, rel=0.02)  # variance per axis


def test_blurred_score_keeps_an_exact_copy_lowest_and_forgives_a_one_pixel_shift():
    """The score blurs the query as draw_monte_carlo blurs the reference, so a copy of a
    generated image still scores 0, and a stroke moved by one pixel, which is far in raw
    pixels, comes out closer than an unrelated image."""
    rng = np.random.default_rng(6)
    generated = np.zeros((40, 28, 28), np.float32)
    for image, column in zip(generated, rng.choice([4, 8, 12, 16, 20], size=40)):
        image[4:24, column] = 1.0  # vertical strokes, never in neighbouring columns
    settings = {**gma.default_settings(), "NEIGHBOURS": 1, "NEIGHBOUR_BLUR": 1.0}
    reference = gma.blur(generated, settings["NEIGHBOUR_BLUR"])
    copy = generated[3]
    shifted = np.roll(generated[3], 1, axis=1)
    unrelated = np.zeros((28, 28), np.float32)
    unrelated[14, 2:26] = 1.0  # a horizontal stroke
    queries = np.stack([copy, shifted, unrelated])
    blurred_scores = gma.image_scores("nearest_generated", None, reference, queries, settings)
    assert blurred_scores[0] == pytest.approx(0.0, abs=0.05)
    assert blurred_scores[0] < blurred_scores[1] < blurred_scores[2]
    raw = {**settings, "NEIGHBOUR_BLUR": 0.0}
    raw_scores = gma.image_scores("nearest_generated", None, gma.blur(generated, 0.0),
                                  queries, raw)
    # In raw pixels the shifted stroke overlaps no generated stroke: sqrt(20 + 20) away.
    assert raw_scores[1] == pytest.approx(np.sqrt(40), rel=1e-3)
    assert blurred_scores[1] < 0.5 * raw_scores[1]
