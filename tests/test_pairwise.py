"""Exact pairwise L1 sums by sorting, against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import pairwise


def test_order_keys_sort_like_the_floats_they_encode():
    # The sorted global compactness compares int32 keys, not floats: they must
    # order every float32 (signs, zeros of both signs, subnormals, infinities)
    # as the floats order, tie exactly when the floats are equal, and decode
    # back to the floats.
    tiny = np.finfo(np.float32).smallest_subnormal
    special = [-np.inf, -3.5e38, -1.0, -tiny, -0.0, 0.0, tiny, 1e-30, 1.0, 3.5e38, np.inf]
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [special, rng.normal(scale=10.0, size=200), rng.integers(-3, 3, 50)]
    ).astype(np.float32)
    keys = pairwise.order_keys(tf.constant(values)).numpy()
    order = lambda a: (a[:, None] > a[None, :]).astype(int) - (a[:, None] < a[None, :])
    np.testing.assert_array_equal(order(keys), order(values))
    decoded = tf.bitcast(pairwise.flip_negative(tf.constant(keys)), tf.float32).numpy()
    np.testing.assert_array_equal(decoded, values)
    assert not np.signbit(decoded[values == 0]).any()


@pytest.mark.parametrize("n_ref, n_query, k, classes", [(9, 7, 5, 3), (16, 4, 3, 6), (1, 1, 2, 1)])
def test_l1_sums_sorted_match_numpy_with_ties_and_missing_labels(n_ref, n_query, k, classes):
    rng = np.random.default_rng(n_ref)
    # Few distinct values: many ties between and within the two sets.
    z_ref = rng.integers(-2, 3, (n_ref, k)).astype(np.float32)
    z_query = rng.integers(-2, 3, (n_query, k)).astype(np.float32)
    y_ref = rng.integers(0, classes, n_ref).astype(np.int32)
    y_query = rng.integers(0, classes + 1, n_query).astype(np.int32)  # maybe no reference
    z_ref_var, z_query_var = tf.Variable(z_ref), tf.Variable(z_query)
    with tf.GradientTape(persistent=True) as tape:
        all_sums, same_sums = pairwise.l1_sums_sorted(
            z_ref_var, tf.constant(y_ref), z_query_var, tf.constant(y_query), classes + 1
        )
        total = tf.reduce_sum(all_sums) + 2.0 * tf.reduce_sum(same_sums)
    distances = np.abs(z_query[:, None, :] - z_ref[None, :, :])  # [M, N, k]
    same = (y_query[:, None] == y_ref[None, :])[..., None]
    np.testing.assert_allclose(all_sums.numpy(), distances.sum(1).T, atol=1e-5)
    np.testing.assert_allclose(same_sums.numpy(), (distances * same).sum(1).T, atol=1e-5)
    # d/dq of |q - r| is sign(q - r); a tie counts the reference as above: -1.
    signs = np.where(z_query[:, None, :] > z_ref[None, :, :], 1.0, -1.0)
    expected = (signs * (1.0 + 2.0 * same)).sum(1)
    np.testing.assert_allclose(tape.gradient(total, z_query_var).numpy(), expected, atol=1e-5)
    assert tape.gradient(total, z_ref_var) is None  # the references are constants


def test_l1_sums_naive_is_the_pairwise_matrix():
    z_ref = np.array([[0.0, 1.0], [2.0, -1.0]], np.float32)
    z_query = np.array([[1.0, 1.0]], np.float32)
    np.testing.assert_allclose(pairwise.l1_sums_naive(z_ref, z_query).numpy(), [[1.0, 3.0]])
