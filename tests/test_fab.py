"""Tests for keras_adr.attacks.fab (targeted FAB, Croce & Hein 2020)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import attacks

_DIMS, _CLASSES = 64, 5


def _reach(g, x, radius, lo=0.0, hi=1.0):
    """Largest g . d over |d|_inf <= radius with x + d in [lo, hi] (numpy)."""
    room = np.where(g > 0, hi - x, np.where(g < 0, x - lo, 0.0))
    return np.sum(np.abs(g) * np.minimum(radius, room))


def _bisect_radius(g, x, c):
    """Smallest L-inf radius with a box step d, g . d = c (inf if none), by bisection."""
    g, c = (g, c) if c >= 0 else (-g, -c)
    if _reach(g, x, 1.0) < c:
        return np.inf
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _reach(g, x, mid) < c else (low, mid)
    return high


def _linear_model(seed=0):
    rng = np.random.default_rng(seed)
    w = (0.3 * rng.normal(size=(_DIMS, _CLASSES))).astype(np.float32)
    b = rng.normal(size=_CLASSES).astype(np.float32)
    x = rng.uniform(size=(24, 8, 8, 1)).astype(np.float32)

    def model(images):
        return tf.matmul(tf.reshape(images, [-1, _DIMS]), w) + b

    y = np.argmax(model(x).numpy(), -1).astype(np.int32)
    return model, w, b, x, y


def _exact_min_linf(w, b, x, y):
    """Minimal L-inf distance (in [0, 1]^d) to a misclassification of a linear model."""
    out = []
    for xi, yi in zip(x.reshape(len(x), -1).astype(np.float64), y):
        z = xi @ w + b
        out.append(
            min(
                _bisect_radius(w[:, t] - w[:, yi], xi, z[yi] - z[t])
                for t in range(w.shape[1])
                if t != yi
            )
        )
    return np.asarray(out)


def test_linf_hyperplane_projection_is_the_smallest_box_step():
    rng = np.random.default_rng(1)
    points = rng.uniform(size=(6, 30)).astype(np.float32)
    points[:, :5] = 0.0  # Pixels on the faces of the box.
    w = rng.normal(size=(6, 30)).astype(np.float32)
    w[:, 5:8] = 0.0
    c = np.array([0.5, -0.8, 2.0, 0.0, -3.0, 40.0], np.float32)  # The last is unreachable.
    d = attacks.project_to_hyperplane_linf(
        tf.constant(points), tf.constant(w), tf.constant(c)
    ).numpy()
    assert np.all(points + d >= -1e-6) and np.all(points + d <= 1 + 1e-6)
    assert np.all(d[:, 5:8] == 0)
    for i in range(5):
        np.testing.assert_allclose(np.dot(w[i], d[i]), c[i], atol=1e-4)
        np.testing.assert_allclose(
            np.abs(d[i]).max(), _bisect_radius(w[i], points[i], c[i]), atol=1e-5
        )
    # Unreachable: as far as the box allows towards the hyperplane.
    np.testing.assert_allclose(np.dot(w[5], d[5]), _reach(w[5], points[5], 1.0), rtol=1e-5)


def test_fab_matches_the_exact_minimal_linf_distance_of_a_linear_model():
    model, w, b, x, y = _linear_model()
    exact = _exact_min_linf(w, b, x, y)
    out = attacks.fab_min_norm(model, x, y, num_targets=_CLASSES - 1, steps=100, seed=0)
    distance, x_adv = out["distance"].numpy(), out["x_adv"].numpy()
    assert np.all(np.isfinite(exact))
    # Never below the minimum (the points are truly adversarial), and within 2% of it.
    assert np.all(distance >= exact * (1 - 1e-4))
    assert np.all(distance <= exact * 1.02)
    assert np.all(np.argmax(model(x_adv).numpy(), -1) != y)
    np.testing.assert_allclose(np.abs(x_adv - x).reshape(len(x), -1).max(1), distance, rtol=1e-5)
    # One target class (the most likely wrong one) cannot beat all of them.
    one = attacks.fab_min_norm(model, x, y, num_targets=1, steps=100)["distance"].numpy()
    assert np.all(one >= distance * (1 - 1e-4))


def _l2_box_step(g, x, c, lo=0.0, hi=1.0):
    """Smallest L2 box step d with g . d = c, by bisection on the multiplier (numpy).

    d_i = sign(g_i) min(lam |g_i|, room_i) for the lam with g . d = |c| (c's sign folded
    into g); None if the box does not reach the hyperplane.
    """
    g, c = (g, c) if c >= 0 else (-g, -c)
    room = np.where(g > 0, hi - x, np.where(g < 0, x - lo, 0.0))
    step = lambda lam: np.sign(g) * np.minimum(lam * np.abs(g), room)
    if np.dot(g, step(1e12)) < c:
        return None
    low, high = 0.0, 1e12
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.dot(g, step(mid)) < c else (low, mid)
    return step(high)


def test_l2_hyperplane_projection_is_the_smallest_box_step():
    rng = np.random.default_rng(2)
    points = rng.uniform(size=(7, 30)).astype(np.float32)
    points[:, :5] = 1.0  # Pixels on the faces of the box,
    points[5] = rng.uniform(0.3, 0.7, size=30)  # except in the row where the box does not bind.
    w = rng.normal(size=(7, 30)).astype(np.float32)
    w[:, 5:8] = 0.0
    # The box binds for the large ones, not for 0.05; 0 needs no step; 40 is unreachable.
    c = np.array([0.5, -0.8, 2.0, 0.0, -3.0, 0.05, 40.0], np.float32)
    d = attacks.project_to_hyperplane_l2(tf.constant(points), tf.constant(w), tf.constant(c))
    d = d.numpy().astype(np.float64)
    assert np.all(points + d >= -1e-6) and np.all(points + d <= 1 + 1e-6)
    assert np.all(d[:, 5:8] == 0)
    for i in range(6):
        np.testing.assert_allclose(np.dot(w[i], d[i]), c[i], atol=1e-4)
        exact = _l2_box_step(w[i].astype(np.float64), points[i].astype(np.float64), c[i])
        np.testing.assert_allclose(d[i], exact, atol=1e-5)
    # Where the box does not bind: the plain projection c w / |w|^2.
    np.testing.assert_allclose(d[5], c[5] * w[5] / np.dot(w[5], w[5]), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(d[3], 0.0)
    # Unreachable: every coordinate that helps goes to its face.
    assert _l2_box_step(w[6].astype(np.float64), points[6].astype(np.float64), c[6]) is None
    faces = np.where(w[6] > 0, 1.0 - points[6], np.where(w[6] < 0, -points[6], 0.0))
    np.testing.assert_allclose(d[6], faces, atol=1e-6)


def test_fab_l2_matches_the_closed_form_minimal_l2_distance_of_a_linear_model():
    rng = np.random.default_rng(3)
    w = (0.3 * rng.normal(size=(_DIMS, _CLASSES))).astype(np.float32)
    b = rng.normal(size=_CLASSES).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(24, 8, 8, 1)).astype(np.float32)

    def model(images):
        return tf.matmul(tf.reshape(images, [-1, _DIMS]), w) + b

    y = np.argmax(model(x).numpy(), -1).astype(np.int32)
    flat = x.reshape(len(x), -1).astype(np.float64)
    # |w . x + b| / |w| over the hyperplanes z_t = z_y; the projection of x onto the
    # closest one lies inside the box (checked), so the box does not change the minimum.
    exact = np.full(len(x), np.inf)
    for i, (xi, yi) in enumerate(zip(flat, y)):
        for t in range(_CLASSES):
            if t != yi:
                g, c = w[:, t] - w[:, yi], b[t] - b[yi]
                margin = np.dot(g, xi) + c
                if -margin / np.linalg.norm(g) < exact[i]:
                    exact[i] = -margin / np.linalg.norm(g)
                    nearest = xi - margin * g / np.dot(g, g)
        assert nearest.min() > 0.0 and nearest.max() < 1.0
    out = attacks.fab_min_norm(model, x, y, norm="l2", num_targets=_CLASSES - 1, steps=100, seed=0)
    distance, x_adv = out["distance"].numpy(), out["x_adv"].numpy()
    # Never below the minimum (the points are truly adversarial), and within 2% of it.
    assert np.all(distance >= exact * (1 - 1e-4))
    assert np.all(distance <= exact * 1.02)
    assert np.all(np.argmax(model(x_adv).numpy(), -1) != y)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    np.testing.assert_allclose(
        np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1), distance, rtol=1e-5
    )
    # Within a radius: points in the L2 ball and the box, fooling exactly where FAB's fit.
    epsilon = float(np.median(exact))
    x_eps = attacks.fab(
        model, x, y, epsilon=epsilon, norm="l2", num_targets=_CLASSES - 1, steps=100, seed=0
    ).numpy()
    assert x_eps.min() >= 0.0 and x_eps.max() <= 1.0
    assert np.linalg.norm((x_eps - x).reshape(len(x), -1), axis=1).max() <= epsilon * (1 + 1e-6)
    fooled = np.argmax(model(x_eps).numpy(), -1) != y
    np.testing.assert_array_equal(fooled, distance <= epsilon)
    assert fooled.any() and not fooled.all()


def test_fab_within_epsilon_returns_points_in_the_ball_that_fool_when_reported(trained_tiny):
    model, x, y = trained_tiny
    x, y = x[:16], y[:16]
    # A radius that half of the minimal perturbations fit in.
    minimal = attacks.fab_min_norm(model, x, y, num_targets=2, steps=20)["distance"].numpy()
    epsilon = float(np.median(minimal[np.isfinite(minimal)]))
    found = attacks.fab_min_norm(model, x, y, epsilon=epsilon, num_targets=2, steps=20, seed=0)
    x_adv = attacks.fab(model, x, y, epsilon=epsilon, num_targets=2, steps=20, seed=0).numpy()
    assert x_adv.shape == x.shape and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() <= epsilon + 1e-6
    success = found["distance"].numpy() <= epsilon
    fooled = np.argmax(model(x_adv, training=False), -1) != y
    assert success.any() and not success.all()
    np.testing.assert_array_equal(fooled, success)
    np.testing.assert_array_equal(x_adv[~success], x[~success])


def test_fab_skips_misclassified_points_and_empty_batches(trained_tiny):
    model, x, y = trained_tiny
    x, y = x[:4], y[:4].copy()
    y[0] = (y[0] + 1) % 3
    out = attacks.fab_min_norm(model, x, y, num_targets=1, steps=3)
    assert out["distance"].numpy()[0] == 0.0
    np.testing.assert_array_equal(out["x_adv"].numpy()[0], x[0])
    assert attacks.fab(model, x[:0], y[:0], epsilon=0.1, num_targets=1).shape == (0, 8, 8, 1)
    compiled = tf.function(
        lambda a, b: attacks.fab(model, a, b, epsilon=0.1, num_targets=1, steps=3)
    )
    assert compiled(x, y).shape == x.shape


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_targets=3), "num_targets"),  # The tiny model has 3 classes: 2 wrong ones.
        (dict(num_targets=0), "num_targets"),
        (dict(steps=0), "steps"),
        (dict(restarts=1.5), "restarts"),
        (dict(alpha_max=2.0), "alpha_max"),
        (dict(eta=0.5), "eta"),
        (dict(beta=-1.0), "beta"),
        (dict(norm="l1"), "norm"),
        (dict(epsilon=None), "epsilon"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(seed=1.5), "seed"),
        (dict(y=None), "y"),
    ],
)
def test_fab_rejects_bad_arguments_in_one_line(trained_tiny, kwargs, match):
    model, x, y = trained_tiny
    args = {"x": x[:2], "y": y[:2], "epsilon": 0.1, "num_targets": 2, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match) as error:
        attacks.fab(model, args.pop("x"), args.pop("y"), **args)
    assert "\n" not in str(error.value)
