"""Label propagation over a k-nearest-neighbour graph (Zhou et al. 2004).

The graph's nodes are the clean and the adversarial latent codes of a batch;
labels spread from the clean nodes to the unlabeled adversarial ones and give
soft targets for the clustering-assumption term of ADR.
"""

import tensorflow as tf

# Keeps the bandwidth and the degree normalisation away from zero for
# degenerate batches (identical codes, isolated nodes).
_TINY = 1e-12


def flatten_batch(t):
    """`[B, ...]` -> float32 `[B, d]`: latent codes of any rank as vectors."""
    t = tf.cast(t, tf.float32)
    return tf.reshape(t, [tf.shape(t)[0], -1])


def _squared_distances(points):
    sq_norms = tf.reduce_sum(tf.square(points), axis=1)
    d2 = sq_norms[:, None] + sq_norms[None, :] - 2.0 * tf.matmul(points, points, transpose_b=True)
    return tf.maximum(d2, 0.0)


def _median_off_diagonal(values):
    """Median of the off-diagonal entries of a square matrix (lower median)."""
    n = tf.shape(values)[0]
    off_diagonal = tf.boolean_mask(values, ~tf.eye(n, dtype=tf.bool))
    ordered = tf.sort(off_diagonal)
    return ordered[(tf.size(ordered) - 1) // 2]


def affinity_graph(points, k=10):
    """Symmetric k-NN Gaussian affinity matrix with a zero diagonal.

    `W_ij = exp(-d_ij^2 / (2 sigma^2))`, with `sigma` the median pairwise
    distance, kept when j is among the k nearest neighbours of i or i among
    those of j.

    Args:
        points: `[N, ...]` node features (flattened).
        k: Number of neighbours per node (capped at N - 1).

    Returns:
        `[N, N]` float32 affinities.
    """
    points = flatten_batch(points)
    n = tf.shape(points)[0]
    d2 = _squared_distances(points)
    sigma = tf.maximum(_median_off_diagonal(tf.sqrt(d2)), _TINY)
    not_self = 1.0 - tf.eye(n)
    weights = tf.exp(-d2 / (2.0 * tf.square(sigma))) * not_self
    neighbors = tf.minimum(k, n - 1)
    # Nearest = largest affinity; self is excluded by its -1 score.
    _, nearest = tf.math.top_k(weights - (1.0 - not_self), k=neighbors)
    knn = tf.reduce_max(tf.one_hot(nearest, n), axis=1)  # [N, N] 0/1
    return weights * tf.maximum(knn, tf.transpose(knn))


def normalized_affinity(weights):
    """`S = D^-1/2 W D^-1/2` with `D` the degree matrix."""
    inv_sqrt_degree = tf.math.rsqrt(tf.maximum(tf.reduce_sum(weights, axis=1), _TINY))
    return inv_sqrt_degree[:, None] * weights * inv_sqrt_degree[None, :]


def propagate(affinity, seeds, alpha=0.99):
    """Closed-form label propagation `F = (I - alpha S)^-1 Y`, row-normalised.

    Args:
        affinity: `[N, N]` normalised affinity `S`.
        seeds: `[N, C]` initial labels `Y` (one-hot rows, zero for unlabeled).
        alpha: In (0, 1): how far labels spread.

    Returns:
        `[N, C]` label distributions. Rows of nodes with no path to a labeled
        node are all zero (they carry no target).
    """
    n = tf.shape(affinity)[0]
    system = tf.eye(n) - alpha * affinity
    spread = tf.linalg.solve(system, seeds)
    spread = tf.maximum(spread, 0.0)  # (I - aS)^-1 >= 0; clears round-off
    return spread / tf.maximum(tf.reduce_sum(spread, axis=1, keepdims=True), _TINY)


def propagate_labels(z, y, z_adv, num_classes, alpha=0.99, k=10):
    """Soft labels of the adversarial codes, propagated from the clean ones.

    Builds `affinity_graph` over `[sg(z); sg(z_adv)]`, propagates one-hot `y`
    from the clean nodes (the adversarial nodes start unlabeled) and returns
    the adversarial rows.

    Args:
        z: `[N, ...]` clean latent codes (the labeled nodes).
        y: `[N]` integer labels of `z`.
        z_adv: `[M, ...]` adversarial latent codes (unlabeled nodes).
        num_classes: Number of classes C.
        alpha: Propagation alpha in (0, 1).
        k: Neighbours per node.

    Returns:
        `[M, C]` stop-gradient soft targets (rows sum to 1, or 0 for nodes
        not connected to any labeled node).
    """
    z = tf.stop_gradient(flatten_batch(z))
    z_adv = tf.stop_gradient(flatten_batch(z_adv))
    nodes = tf.concat([z, z_adv], axis=0)
    affinity = normalized_affinity(affinity_graph(nodes, k=k))
    seeds = tf.concat(
        [
            tf.one_hot(tf.cast(y, tf.int32), num_classes),
            tf.zeros([tf.shape(z_adv)[0], num_classes]),
        ],
        axis=0,
    )
    spread = propagate(affinity, seeds, alpha=alpha)
    return tf.stop_gradient(spread[tf.shape(z)[0] :])
