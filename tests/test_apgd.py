"""Tests for keras_adr.attacks.apgd (Auto-PGD, Croce & Hein 2020)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fashion_arrays

from keras_adr import attacks
from keras_adr.attacks._gradient import eot_input_gradient

_EPSILON = 0.05
_NUM_EXAMPLES = 200


@pytest.fixture(scope="module")
def trained():
    """A small dense classifier trained for a few seconds on 1,500 Fashion-MNIST images."""
    (x_train, y_train), (x, y) = fashion_arrays(1500, _NUM_EXAMPLES)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return model, x, y


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False), -1) == np.asarray(y)))


def _assert_valid(x_adv, x, epsilon, norm):
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= epsilon + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= epsilon * (1 + 1e-5)


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (gaps shrink by 0.03, at least 0.06).
    assert attacks.apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    assert attacks.apgd_checkpoints(20) == (5, 9, 12, 14, 16, 18, 19)
    assert attacks.apgd_checkpoints(1) == ()
    for steps in (3, 10, 37, 250):
        points = attacks.apgd_checkpoints(steps)
        assert list(points) == sorted(set(points)) and all(0 < w < steps for w in points)
    with pytest.raises(ValueError, match="steps"):
        attacks.apgd_checkpoints(0)


def test_dlr_losses_match_an_independent_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 0], np.int32)
    target = np.array([1, 2, 3, 4, 0, 2], np.int32)
    s = -np.sort(-logits, axis=1)
    rows = np.arange(6)
    other = np.where(np.eye(5, dtype=bool)[y], -np.inf, logits).max(axis=1)
    expected = -(logits[rows, y] - other) / (s[:, 0] - s[:, 2] + 1e-12)
    expected_t = -(logits[rows, y] - logits[rows, target]) / (
        s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12
    )
    got = attacks._apgd_objective(tf.constant(logits), tf.constant(y), tf.constant(y), "dlr", False)
    got_t = attacks._apgd_objective(
        tf.constant(logits), tf.constant(y), tf.constant(target), "dlr", True
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got_t, expected_t, rtol=1e-5)


@pytest.mark.parametrize("loss,targeted", [("ce", False), ("dlr", False), ("dlr", True)])
def test_linf_results_in_ball_and_range(trained, loss, targeted):
    model, x, y = trained
    attack = tf.function(
        lambda a, b: attacks.apgd(
            model, a, b, epsilon=_EPSILON, steps=20, loss=loss, targeted=targeted, seed=1
        )
    )
    x_adv = attack(x[:64], y[:64])
    _assert_valid(x_adv, x[:64], _EPSILON, "linf")
    assert _accuracy(model, x_adv, y[:64]) < _accuracy(model, x[:64], y[:64])


def test_l2_results_in_ball_and_range(trained):
    model, x, y = trained
    x_adv = attacks.apgd(model, x[:32], y[:32], epsilon=1.0, steps=10, norm="l2", seed=0)
    _assert_valid(x_adv, x[:32], 1.0, "l2")
    assert _accuracy(model, x_adv, y[:32]) < _accuracy(model, x[:32], y[:32])


def test_apgd_at_least_as_strong_as_pgd20(trained):
    model, x, y = trained
    pgd_acc = _accuracy(
        model,
        attacks.pgd(model, x, y, epsilon=_EPSILON, step_size=2.5 * _EPSILON / 20, steps=20),
        y,
    )
    apgd_ce = tf.function(lambda a, b: attacks.apgd(model, a, b, epsilon=_EPSILON, seed=0))
    apgd_t = tf.function(
        lambda a, b: attacks.apgd_dlr_targeted(model, a, b, epsilon=_EPSILON, seed=0)
    )
    slack = 2 / _NUM_EXAMPLES
    assert _accuracy(model, apgd_ce(x, y), y) <= pgd_acc + slack
    assert _accuracy(model, apgd_t(x, y), y) <= pgd_acc + slack


def test_keeps_misclassified_points_and_is_reproducible(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    clean_wrong = np.argmax(model(x), -1) != np.asarray(y)
    assert clean_wrong.any()
    run = lambda seed: attacks.apgd(
        model, x, y, epsilon=_EPSILON, steps=10, restarts=2, seed=seed
    ).numpy()
    x_adv = run(3)
    # An example misclassified at x is returned as x: it needs no perturbation.
    np.testing.assert_array_equal(x_adv[clean_wrong], np.asarray(x)[clean_wrong])
    np.testing.assert_array_equal(run(3), x_adv)


def test_more_targets_and_restarts_never_weaken_the_attack(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]

    def wrong(**kwargs):
        x_adv = attacks.apgd(
            model, x, y, epsilon=0.02, steps=10, loss="dlr", targeted=True, seed=5, **kwargs
        )
        return np.argmax(model(x_adv), -1) != np.asarray(y)

    one = wrong(num_targets=1)
    # The first run of the 3-target attack is the 1-target attack: runs only add.
    assert np.all(wrong(num_targets=3)[one])


def test_zero_gradient_model_does_not_crash():
    class Masked(keras.layers.Layer):
        def call(self, images):
            flat = tf.reshape(tf.stop_gradient(tf.round(images)), [tf.shape(images)[0], -1])
            return flat[:, :4] * tf.constant([1.0, -1.0, 2.0, 0.5])

    x = tf.random.stateless_uniform((8, 4, 4, 1), [0, 1])
    y = tf.zeros([8], tf.int32)
    x_adv = attacks.apgd(Masked(), x, y, epsilon=0.1, steps=5, loss="dlr", seed=0)
    _assert_valid(x_adv, x, 0.1, "linf")


def _linear_model(num_classes):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(num_classes)]
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(norm="l1"), "norm"),
        (dict(loss="kl"), "loss"),
        (dict(restarts=0), "restarts"),
        (dict(targeted=True, num_targets=0), "num_targets"),
        (dict(rho=0.0), "rho"),
        (dict(rho=1.5), "rho"),
        (dict(seed=1.5), "seed"),
        (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
        (dict(targeted="yes"), "targeted"),
        (dict(eot_iterations=0), "eot_iterations"),
        (dict(eot_iterations=2.0), "eot_iterations"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    model = _linear_model(5)
    x = tf.fill((2, 2, 2, 1), 0.5)
    y = tf.constant([0, 1])
    kwargs = {"epsilon": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        attacks.apgd(model, x, y, **kwargs)


def test_bad_inputs_raise():
    model = _linear_model(5)
    x = tf.fill((2, 2, 2, 1), 0.5)
    with pytest.raises(ValueError, match="labels"):
        attacks.apgd(model, x, None, epsilon=0.1)
    with pytest.raises(ValueError, match="floating"):
        attacks.apgd(model, tf.zeros((2, 2, 2, 1), tf.uint8), [0, 1], epsilon=0.1)
    with pytest.raises(ValueError, match="clip_min"):
        attacks.apgd(model, x + 1.0, [0, 1], epsilon=0.1)


def test_too_few_classes_raise():
    x = tf.fill((2, 2, 2, 1), 0.5)
    y = tf.constant([0, 1])
    with pytest.raises(ValueError, match="at least 3 classes"):
        attacks.apgd(_linear_model(2), x, y, epsilon=0.1, loss="dlr")
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.apgd(_linear_model(3), x, y, epsilon=0.1, loss="dlr", targeted=True)
    with pytest.raises(ValueError, match="num_targets"):
        attacks.apgd_dlr_targeted(_linear_model(5), x, y, epsilon=0.1, num_targets=5)
    # Three classes are enough for the untargeted DLR loss, two for CE.
    attacks.apgd(_linear_model(3), x, y, epsilon=0.1, steps=2, loss="dlr")
    attacks.apgd(
        _linear_model(2), x, y, epsilon=0.1, steps=2, loss="ce", targeted=True, num_targets=1
    )


class _NoisyAtInference(keras.layers.GaussianNoise):
    """GaussianNoise that stays on at inference: a randomized defense."""

    def call(self, inputs, training=False):
        return super().call(inputs, training=True)


def _noisy_linear_model(dims=16, classes=3, stddev=0.5):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((dims,)), _NoisyAtInference(stddev, seed=1), keras.layers.Dense(classes)]
    )
    w, b = (v.numpy().astype(np.float64) for v in model.layers[-1].weights)
    model.layers[-1].set_weights([(3 * w).astype(np.float32), b.astype(np.float32)])
    return model, 3 * w, b


def _cosine_error(estimate, truth):
    estimate, truth = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    cos = (
        np.sum(estimate * truth, 1)
        / np.linalg.norm(estimate, axis=1)
        / np.linalg.norm(truth, axis=1)
    )
    return 1.0 - cos


def test_eot_gradients_are_closer_to_the_expected_gradient_than_one_sample():
    stddev = 0.5
    model, w, b = _noisy_linear_model(stddev=stddev)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 16)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    # The expected cross-entropy input gradient, E_n[W (softmax((x + n) W + b) - onehot(y))],
    # from 100,000 noise samples per example in numpy.
    truth = []
    for xi, yi in zip(x.astype(np.float64), y):
        z = (xi + stddev * rng.normal(size=(100_000, 16))) @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[:, yi] -= 1.0
        truth.append(w @ p.mean(0))
    ce = lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
    gradient = tf.function(
        lambda images, n: eot_input_gradient(model, ce, images, n)[2], reduce_retracing=True
    )
    single = [_cosine_error(gradient(x, 1), truth) for _ in range(5)]
    averaged = [_cosine_error(gradient(x, 20), truth) for _ in range(5)]
    # One sample's direction misses the expected one; 20 samples' average is far closer
    # (its variance is 20 times smaller), for most examples and draws and on the whole.
    assert np.mean(averaged) < 0.25 * np.mean(single)
    assert np.mean(np.asarray(averaged) < np.asarray(single)) > 0.8


def test_eot_on_a_deterministic_model_is_plain_apgd_and_stays_valid_on_a_random_one(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    run = lambda **kwargs: attacks.apgd(
        model, x, y, epsilon=_EPSILON, steps=10, seed=2, **kwargs
    ).numpy()
    # Four identical gradients average to the same gradient, exactly (powers of two).
    np.testing.assert_array_equal(run(eot_iterations=4), run())
    np.testing.assert_array_equal(run(eot_iterations=1), run())
    noisy, _, _ = _noisy_linear_model()
    x = np.random.default_rng(1).uniform(size=(6, 16)).astype(np.float32)
    y = np.arange(6, dtype=np.int32) % 3
    for norm, epsilon in (("linf", 0.1), ("l2", 0.5)):
        x_adv = attacks.apgd(
            noisy, x, y, epsilon=epsilon, norm=norm, steps=5, eot_iterations=20, seed=0
        )
        _assert_valid(x_adv, x, epsilon, norm)
