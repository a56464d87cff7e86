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


def test_monte_carlo_logits_are_reproducible_and_batch_size_independent():
    generator = gma.build_generator(8, (16,))
    discriminator = gma.build_discriminator((16,))
    whole = gma.monte_carlo_logits(generator, discriminator, 1000, 1000, 8, seed=3)
    again = gma.monte_carlo_logits(generator, discriminator, 1000, 1000, 8, seed=3)
    other_seed = gma.monte_carlo_logits(generator, discriminator, 1000, 1000, 8, seed=4)
    np.testing.assert_array_equal(whole, again)
    assert not np.array_equal(whole, other_seed)
    assert whole.shape == (1000,) and np.all(np.isfinite(whole))
    # Batches of 300 draw different noise, but they are all drawn and scored: 1000 values.
    batched = gma.monte_carlo_logits(generator, discriminator, 1000, 300, 8, seed=3)
    assert batched.shape == (1000,) and np.all(np.isfinite(batched))
    np.testing.assert_array_equal(batched[:300],
                                  gma.monte_carlo_logits(generator, discriminator, 300, 300, 8,
                                                         seed=3))
