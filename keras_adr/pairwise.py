"""Exact pairwise L1 sums between two sets of codes, by sorting (global compactness).

Global compactness needs, for every adversarial code i and feature d,
`sum_j |z_ref_j,d - z_query_i,d|` over all clean codes j and over those with
i's label. `l1_sums_sorted` computes both exactly in O((N + M) k log N)
from sorted orders, binary searches and prefix sums, instead of the
`[M, N, k]` tensor of `l1_sums_naive` (the reference implementation).
Other exact forms were measured and were not faster (docs/benchmarks.md,
"Removed studies").
"""

from typing import NamedTuple

import tensorflow as tf


def l1_sums_naive(z_ref, z_query):
    """`[M, N]` matrix of `sum_d |z_ref_j,d - z_query_i,d|` via a `[M, N, k]` tensor."""
    return tf.reduce_sum(tf.abs(z_query[:, None, :] - z_ref[None, :, :]), axis=-1)


def order_keys(values):
    """float32 -> int32 keys in the same order; `flip_negative` decodes them.

    Non-negative floats already order like their bit patterns; negative ones
    order in reverse, so their magnitude bits are flipped. -0.0 becomes +0.0
    first, so equal values get equal keys. Binary searches on the keys took
    0.3x (normal values) to 0.8x (half of them zero) the time of searches on
    the floats (2-core Xeon, `[1024, 128]`).
    """
    bits = tf.bitcast(values, tf.int32)
    bits = tf.where(tf.equal(bits, tf.int32.min), 0, bits)
    return flip_negative(bits)


def flip_negative(bits):
    """Flips the magnitude bits of negative int32s: its own inverse."""
    return tf.bitwise.bitwise_xor(
        bits, tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 31), tf.int32.max)
    )


def sort_ascending(keys):
    """int32 `[k, N]` sorted along the last axis, and the order (TopK sorts descending)."""
    descending, order = tf.math.top_k(tf.bitwise.invert(keys), k=tf.shape(keys)[-1])
    return tf.bitwise.invert(descending), order


def l1_sums_from_ranks(queries, count_below, count, sum_below, bounds):
    """`sum_j |r_j - q|` over a set of references, from their ranks and prefix sums.

    `sum_{r<q} (q - r) + sum_{r>=q} (r - q) = q (2c - n) + T - 2S` with c of
    the n references below q (sum S) and T their total. The references are a
    segment of a sorted order with prefix sums P: `S = sum_below - P_start`,
    `T = P_end - P_start`, so `T - 2S = bounds - 2 sum_below` with
    `bounds = P_start + P_end`. Only `queries` carries gradient, so
    d/dq = 2c - n: the rank-count gradient of the L1 sum.
    """
    rank_gradient = tf.cast(2 * count_below - count, tf.float32)  # from int32 counts: no gradient
    return queries * rank_gradient + tf.stop_gradient(bounds - 2.0 * sum_below)


class ValueOrder(NamedTuple):
    """Each feature's references sorted by value, the queries placed in it (`value_order`)."""

    keys: tf.Tensor  # [k, N] int32 order keys of the references, unsorted
    query_keys: tf.Tensor  # [k, M] int32 order keys of the queries
    order: tf.Tensor  # [k, N] reference index at each sorted position
    ordered: tf.Tensor  # [k, N] reference values, sorted
    below: tf.Tensor  # [k, M] number of references below each query
    all_sums: tf.Tensor  # [k, M] sum over all references of |r - q|


def value_order(refs, queries):
    """Sorts feature-major `refs` `[k, N]` by value and sums `|r - q|` for `queries` `[k, M]`."""
    n_ref = tf.shape(refs)[1]
    keys = order_keys(refs)
    ref_keys, order = sort_ascending(keys)
    ordered = tf.bitcast(flip_negative(ref_keys), tf.float32)
    prefix = _pad_front(tf.cumsum(ordered, axis=1))
    query_keys = order_keys(tf.stop_gradient(queries))
    below = tf.searchsorted(ref_keys, query_keys, side="left")
    all_sums = l1_sums_from_ranks(
        queries, below, n_ref, tf.gather(prefix, below, batch_dims=1), prefix[:, -1:]
    )
    return ValueOrder(keys, query_keys, order, ordered, below, all_sums)


def same_label_sums(queries, y_ref, y_query, num_classes, label_ordered, position):
    """`sum_j |r_j - q|` over the references with the query's label.

    Args:
        queries: `[k, M]` feature-major query codes.
        y_ref: `[N]` int32 reference labels.
        y_query: `[M]` int32 query labels.
        num_classes: Scalar int32 above every label.
        label_ordered: `[k, N]` reference values in (label, value) order.
        position: `[k, M]` int32: where each query would go in that order
            (its label's start plus the references of its label below it).

    Returns:
        `[k, M]` float32.
    """
    prefix = _pad_front(tf.cumsum(label_ordered, axis=1))
    class_count = tf.math.bincount(y_ref, minlength=num_classes, maxlength=num_classes)
    class_start = tf.cumsum(class_count, exclusive=True)
    # Per class: the prefix sums before and through its segment, added.
    class_bounds = tf.gather(prefix, class_start, axis=1) + tf.gather(
        prefix, class_start + class_count, axis=1
    )  # [k, C]
    return l1_sums_from_ranks(
        queries,
        position - tf.gather(class_start, y_query),
        tf.gather(class_count, y_query),
        tf.gather(prefix, position, batch_dims=1),
        tf.gather(class_bounds, y_query, axis=1),
    )


def l1_sums_sorted(z_ref, y_ref, z_query, y_query, num_classes):
    """Exact pairwise L1 sums, overall and within label, in O((N + M) k log N).

    Per feature d and query i: `sum_j |z_ref_j,d - z_query_i,d|` over all
    references j, and over the references with the query's label. Each
    feature's references are sorted by value, and then by (label, rank by
    value); each query is located in both orders by binary search, and the
    sums are read from prefix sums. Keys are int32 (`order_keys`; the
    second order's key is `label * (N + 1) + rank`, and a query's is
    `label * (N + 1) + number of references below it`), so the orders and
    the ties are exact: a reference equal to a query counts as above it.

    Args:
        z_ref: `[N, k]` float32 reference (clean) codes; treated as constants.
        y_ref: `[N]` int32 labels of the references.
        z_query: `[M, k]` float32 query (adversarial) codes; the sums' only
            gradient path.
        y_query: `[M]` int32 labels of the queries.
        num_classes: Scalar int32 above every label.

    Returns:
        Two `[k, M]` tensors (feature-major): all-pairs and same-label sums.
    """
    refs = tf.transpose(z_ref)  # [k, N], stop-gradient
    queries = tf.transpose(z_query)  # [k, M], carries gradient
    by_value = value_order(refs, queries)
    n_ref = tf.shape(refs)[1]
    stride = n_ref + 1
    # `rank` = position in the value order: sorting `label * stride + rank`
    # orders by label, then value.
    label_keys, rank = sort_ascending(tf.gather(y_ref, by_value.order) * stride + tf.range(n_ref))
    position = tf.searchsorted(label_keys, y_query * stride + by_value.below, side="left")
    same_sums = same_label_sums(
        queries,
        y_ref,
        y_query,
        num_classes,
        tf.gather(by_value.ordered, rank, batch_dims=1),
        position,
    )
    return by_value.all_sums, same_sums


def _pad_front(prefix):
    """Prefix sums `[k, N]` -> `[k, N + 1]` starting at 0."""
    return tf.pad(prefix, [[0, 0], [1, 0]])


def sample_features(num_features, fraction, seed):
    """Sorted indices of a uniform random subset of `round(fraction * num_features)` features.

    Args:
        num_features: Scalar: how many features there are.
        fraction: Python float in (0, 1]: the share to keep (at least one).
        seed: `[2]` int stateless seed: the same seed gives the same subset
            (on every replica and device).

    Returns:
        `[k']` int32, increasing.
    """
    num_features = tf.cast(num_features, tf.int32)
    kept = tf.maximum(1, tf.cast(tf.round(fraction * tf.cast(num_features, tf.float32)), tf.int32))
    # The ranks of i.i.d. uniform keys are a uniform random permutation.
    keys = tf.random.stateless_uniform([num_features], seed)
    return tf.sort(tf.argsort(keys)[:kept])
