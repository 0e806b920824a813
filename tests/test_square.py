"""Tests for keras_adr.attacks.square (Square Attack, Andriushchenko et al. 2020)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import attacks

_QUERIES = 300
_N = 32


def _margins(model, x, y):
    """z_y - max_{j != y} z_j, computed in numpy."""
    logits = np.asarray(model(x, training=False), np.float64)
    z_y = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    return z_y - others.max(axis=1)


def test_p_schedule_is_the_papers_piecewise_constant_one():
    # On a 10,000-query budget: 0.8 up to iteration 10, then halved after 10, 50, 200, ...
    expected = {
        0: 0.8,
        10: 0.8,
        11: 0.4,
        50: 0.4,
        51: 0.2,
        201: 0.1,
        501: 0.05,
        1001: 0.025,
        2001: 0.0125,
        4001: 0.00625,
        6001: 0.003125,
        8001: 0.0015625,
        9999: 0.0015625,
    }
    for iteration, p in expected.items():
        assert attacks.square_p_schedule(iteration, 10000) == pytest.approx(p)
    # A 5,000-query budget runs the same schedule twice as fast.
    assert attacks.square_p_schedule(5, 5000) == pytest.approx(0.8)
    assert attacks.square_p_schedule(6, 5000) == pytest.approx(0.4)
    assert attacks.square_p_schedule(4001, 5000) == pytest.approx(0.8 / 512)
    assert attacks.square_p_schedule(0, 5000, p_init=0.3) == pytest.approx(0.3)


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.35), ("l2", 3.0)])
def test_square_stays_in_ball_never_worsens_and_breaks_an_undefended_model(
    trained_tiny, norm, epsilon
):
    model, x, y = trained_tiny
    x, y = x[:_N], y[:_N]
    out = attacks.square_details(model, x, y, epsilon=epsilon, norm=norm, queries=_QUERIES, seed=0)
    x_adv = out["x_adv"].numpy()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(_N, -1)
    if norm == "linf":
        assert np.abs(delta).max() <= epsilon + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= epsilon * (1 + 1e-5)
    # The reported margin is the model's at the returned point, and never above the start's.
    margin = out["margin"].numpy()
    np.testing.assert_allclose(margin, _margins(model, x_adv, y), rtol=1e-4, atol=1e-4)
    assert np.all(margin <= out["start_margin"].numpy() + 1e-6)
    assert np.all(out["queries"].numpy() <= _QUERIES)
    clean = np.mean(np.argmax(model(x, training=False), -1) == y)
    robust = np.mean(np.argmax(model(x_adv, training=False), -1) == y)
    assert clean >= 0.9 and robust <= 0.1


def test_square_queries_only_correct_points_within_budget(trained_tiny):
    model, x, y = trained_tiny
    x, y = x[:8], y[:8].copy()
    y[:3] = (y[:3] + 1) % 3  # Misclassified at x: never queried, returned unchanged.
    rows = tf.Variable(0, dtype=tf.int64)

    def counting_model(images):
        rows.assign_add(tf.cast(tf.shape(images)[0], tf.int64))
        return model(images, training=False)

    queries = 40
    out = attacks.square_details(counting_model, x, y, epsilon=0.05, queries=queries, seed=1)
    used = out["queries"].numpy()
    assert np.all(used[:3] == 0) and np.all(used[3:] >= 1) and used.max() <= queries
    np.testing.assert_array_equal(out["x_adv"].numpy()[:3], x[:3])
    # One clean evaluation per example, then only the reported queries.
    assert int(rows.numpy()) == len(x) + used.sum()


def test_square_is_seeded_and_runs_inside_tf_function(trained_tiny):
    model, x, y = trained_tiny
    x, y = x[:5], y[:5]  # An odd batch size.
    kwargs = dict(epsilon=0.1, queries=30)
    first = attacks.square(model, x, y, seed=3, **kwargs).numpy()
    np.testing.assert_array_equal(first, attacks.square(model, x, y, seed=3, **kwargs).numpy())
    assert not np.array_equal(first, attacks.square(model, x, y, seed=4, **kwargs).numpy())
    compiled = tf.function(lambda a, b: attacks.square(model, a, b, seed=3, **kwargs))
    np.testing.assert_array_equal(first, compiled(x, y).numpy())
    single = attacks.square(model, x[:1], y[:1], seed=0, **kwargs).numpy()
    assert single.shape == x[:1].shape


def test_square_empty_batch(trained_tiny):
    model, x, y = trained_tiny
    out = attacks.square(model, x[:0], y[:0], epsilon=0.1, queries=10)
    assert out.shape == (0, *x.shape[1:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(queries=0), "queries"),
        (dict(queries=2.5), "queries"),
        (dict(p_init=1.5), "p_init"),
        (dict(p_init=0), "p_init"),
        (dict(restarts=0), "restarts"),
        (dict(norm="l1"), "norm"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(seed="a"), "seed"),
        (dict(y=None), "y"),
        (dict(x=np.zeros((4, 64), np.float32)), "height, width, channels"),
        (dict(x=np.full((2, 8, 8, 1), 2.0, np.float32)), "clip_min"),
    ],
)
def test_square_rejects_bad_arguments_in_one_line(trained_tiny, kwargs, match):
    model, x, y = trained_tiny
    args = {"x": x[:2], "y": y[:2], "epsilon": 0.1, "queries": 10, **kwargs}
    with pytest.raises(ValueError, match=match) as error:
        attacks.square(model, args.pop("x"), args.pop("y"), **args)
    assert "\n" not in str(error.value)
