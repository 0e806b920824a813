"""The ADR loss terms (Bui et al., ECCV 2020) and the TRADES KL term.

Three layers, from primitive to assembled (the third in `objective.py`):

* `*_per_example` functions take explicit tensors and return one value per
  adversarial example (`[M]` float32). They are what the tests check against
  numpy.
* The batch-mean functions (`local_compactness`, `global_smoothness`, ...)
  are the public functional API: the mean of the per-example values.
* `keras_adr.objective.TERMS` maps every term of the training objective to
  one function of one signature, `term(batch, config) -> [M]`, over an
  `ADRBatch`. `ADRMixin` sums `TERMS[name]` for the enabled terms.

The clean side of every ADR term is a stop-gradient target: only the
adversarial latent codes and logits receive gradient. `sg` below means
`tf.stop_gradient`. `keras.losses.Loss` classes exist for the terms that fit
Keras' `(y_true, y_pred)` contract (clean side, adversarial side).
"""

import keras
import tensorflow as tf

from keras_adr import graph, pairwise
from keras_adr.config import LATENT_NORMALIZATIONS, SMOOTHNESS_PUSHES, ADRConfig
from keras_adr.pairwise import sample_features  # noqa: F401 - losses.sample_features

DEFAULT_LABEL_SCALE = 0.99
# The functions default to the bounded form, as `ADRConfig` does; pass
# `normalization="none"` and `push="cross_entropy"` for the paper's.
DEFAULT_NORMALIZATION = ADRConfig.latent_normalization
DEFAULT_PUSH = ADRConfig.smoothness_push
_TINY = 1e-12

# Added to the mean square before the RMS division: keeps the gradient finite
# (at most ~1e3 times) for an all-zero code, e.g. a dead ReLU layer.
_RMS_EPSILON = 1e-6


def _soft_cross_entropy(targets, logits):
    """`-sum_c targets_c log softmax(logits)_c` per row."""
    return -tf.reduce_sum(targets * tf.nn.log_softmax(tf.cast(logits, tf.float32)), axis=-1)


# ---------------------------------------------------------------------------
# Per-example terms: value for each adversarial example i.
# ---------------------------------------------------------------------------


def normalize_latent(z, normalization="none"):
    """Flattened `[B, k]` codes, divided by their RMS when `normalization="rms"`.

    `z / sqrt(mean_d z_d^2 + 1e-6)`: invariant to a positive rescaling of a
    code, so the gradient of a term on normalised codes is orthogonal to the
    code and cannot grow it.
    """
    z = graph.flatten_batch(z)
    if normalization == "none":
        return z
    if normalization == "rms":
        return z * tf.math.rsqrt(tf.reduce_mean(tf.square(z), axis=1, keepdims=True) + _RMS_EPSILON)
    raise ValueError(
        f"`normalization` must be one of {LATENT_NORMALIZATIONS}; got {normalization!r}."
    )


def local_compactness_per_example(z, z_adv, distance="l1", normalization=DEFAULT_NORMALIZATION):
    """`mean_d |sg(z)_i,d - z_adv_i,d|` (L1) or the mean squared difference (L2).

    With `normalization="rms"` both codes are first divided by their RMS.
    """
    diff = tf.stop_gradient(normalize_latent(z, normalization)) - normalize_latent(
        z_adv, normalization
    )
    if distance == "l1":
        return tf.reduce_mean(tf.abs(diff), axis=1)
    if distance == "l2":
        return tf.reduce_mean(tf.square(diff), axis=1)
    raise ValueError(f"`distance` must be 'l1' or 'l2'; got {distance!r}.")


def local_smoothness_per_example(logits, logits_adv):
    """`CE(softmax(sg(logits_i)), logits_adv_i)`."""
    targets = tf.stop_gradient(tf.nn.softmax(tf.cast(logits, tf.float32)))
    return _soft_cross_entropy(targets, logits_adv)


def pair_weights(y, y_other=None, scale=DEFAULT_LABEL_SCALE):
    """Label-agreement weights of the pairwise terms.

    Args:
        y: `[M]` labels of the adversarial examples (rows).
        y_other: `[N]` labels of the clean examples (columns); `y` if None.
        scale: In (0, 1].

    Returns:
        `[M, N]` float32: 1 where the labels agree, else `1 - 1/scale`.
    """
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    y_other = y if y_other is None else tf.cast(tf.reshape(y_other, [-1]), tf.int32)
    same = tf.cast(tf.equal(y[:, None], y_other[None, :]), tf.float32)
    different_weight = 1.0 - 1.0 / scale
    return same + (1.0 - same) * different_weight


def global_compactness_per_example(
    y,
    z,
    z_adv,
    scale=DEFAULT_LABEL_SCALE,
    *,
    reference=None,
    method="sorted",
    normalization=DEFAULT_NORMALIZATION,
    features=None,
):
    """`mean_j W_ij mean_d |sg(z)_j,d - z_adv_i,d|` for each adversarial example i.

    Args:
        y: `[M]` labels of the adversarial examples.
        z: `[M, ...]` clean latent codes (the references unless `reference`).
        z_adv: `[M, ...]` adversarial latent codes.
        scale: Pair-weight scale, see `pair_weights`.
        reference: Optional `(y_ref, z_ref)`: the clean examples j to compare
            with (e.g. the global batch gathered across replicas).
        method: `"sorted"` (exact, O(B k log B), the default) or `"naive"`
            (the `[B, B, k]` tensor; the reference implementation).
        normalization: `"rms"` (default, as `ADRConfig`): codes divided by
            their RMS first, which bounds the term below; `"none"`: raw
            codes, the paper's (see `LATENT_NORMALIZATIONS`).
        features: Optional `[k']` int indices of the features d to average
            over (after normalization) instead of all of them: with a uniform
            random subset (`sample_features`) the result is an unbiased
            estimate of the full term at about `k'/k` of its cost.

    Returns:
        `[M]` float32.
    """
    y_query = tf.cast(tf.reshape(y, [-1]), tf.int32)
    y_ref, z_ref = (y_query, z) if reference is None else reference
    y_ref = tf.cast(tf.reshape(y_ref, [-1]), tf.int32)
    z_ref = tf.stop_gradient(normalize_latent(z_ref, normalization))
    z_query = normalize_latent(z_adv, normalization)
    if features is not None:
        z_ref = tf.gather(z_ref, features, axis=1)
        z_query = tf.gather(z_query, features, axis=1)
    n_ref = tf.cast(tf.shape(z_ref)[0], tf.float32)
    width = tf.cast(tf.shape(z_ref)[1], tf.float32)
    if method == "naive":
        weights = pair_weights(y_query, y_ref, scale)
        return tf.reduce_sum(weights * pairwise.l1_sums_naive(z_ref, z_query), axis=1) / (
            n_ref * width
        )
    if method != "sorted":
        raise ValueError(f"`method` must be 'sorted' or 'naive'; got {method!r}.")
    # W_ij = (1 - 1/scale) + (1/scale) [y_i == y_j]: an all-pairs part and a
    # same-label part.
    num_classes = tf.maximum(tf.reduce_max(y_ref), tf.reduce_max(y_query)) + 1
    all_sums, same_sums = pairwise.l1_sums_sorted(z_ref, y_ref, z_query, y_query, num_classes)
    weighted = (1.0 - 1.0 / scale) * all_sums + (1.0 / scale) * same_sums
    return tf.reduce_sum(weighted, axis=0) / (n_ref * width)


def global_smoothness_per_example(
    y, logits, logits_adv, scale=DEFAULT_LABEL_SCALE, *, reference=None, push=DEFAULT_PUSH
):
    """Label-weighted pairwise smoothness for each adversarial example i.

    `push="cross_entropy"` (the paper): `mean_j W_ij CE(p_j, q_i)` with
    `p_j = softmax(sg(logits_j))`, `q_i = softmax(logits_adv_i)`, computed as
    one `[M, N] x [N, C]` product (the weighted mean of the clean
    distributions is the target).

    `push="overlap"` (bounded below by 0): same-label pairs as above,
    different-label pairs `(1/scale - 1) <p_j, q_i>`:
    `mean_j ([y_i = y_j] CE(p_j, q_i) + [y_i != y_j] (1/scale - 1) <p_j, q_i>)`.

    Args:
        y: `[M]` labels of the adversarial examples.
        logits: `[M, C]` clean logits (the references unless `reference`).
        logits_adv: `[M, C]` adversarial logits.
        scale: Pair-weight scale.
        reference: Optional `(y_ref, logits_ref)`.
        push: `"overlap"` (default, as `ADRConfig`) or `"cross_entropy"`
            (the paper's), see `SMOOTHNESS_PUSHES`.

    Returns:
        `[M]` float32.
    """
    y_ref, logits_ref = (y, logits) if reference is None else reference
    probs_ref = tf.stop_gradient(tf.nn.softmax(tf.cast(logits_ref, tf.float32)))
    n_ref = tf.cast(tf.shape(probs_ref)[0], tf.float32)
    if push == "cross_entropy":
        targets = tf.matmul(pair_weights(y, y_ref, scale), probs_ref) / n_ref
        return _soft_cross_entropy(targets, logits_adv)
    if push != "overlap":
        raise ValueError(f"`push` must be one of {SMOOTHNESS_PUSHES}; got {push!r}.")
    same = pair_weights(y, y_ref, scale=1.0)  # 1 for equal labels, else 0
    pull = _soft_cross_entropy(tf.matmul(same, probs_ref) / n_ref, logits_adv)
    probs_adv = tf.nn.softmax(tf.cast(logits_adv, tf.float32))
    overlap = tf.matmul(probs_adv, probs_ref, transpose_b=True)  # [M, N]
    push_value = tf.reduce_sum((1.0 - same) * overlap, axis=1) / n_ref
    return pull + (1.0 / scale - 1.0) * push_value


def conditional_entropy_per_example(logits_adv):
    """Entropy of `softmax(logits_adv_i)`; gradient flows through both factors."""
    log_probs = tf.nn.log_softmax(tf.cast(logits_adv, tf.float32))
    return -tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1)


def trades_kl_per_example(logits, logits_adv):
    """`KL(softmax(logits_i) || softmax(logits_adv_i))`, gradient through both."""
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(logits_adv, tf.float32))
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def label_propagation_per_example(
    y, z, z_adv, logits_adv, *, alpha=0.99, k=10, reference=None, reference_adv=None, query_offset=0
):
    """`CE(q_i, logits_adv_i)` with `q` labels propagated from the clean codes.

    Args:
        y: `[M]` labels of the clean examples of the batch.
        z: `[M, ...]` clean latent codes.
        z_adv: `[M, ...]` adversarial latent codes.
        logits_adv: `[M, C]` adversarial logits.
        alpha: Propagation alpha in (0, 1).
        k: Neighbours per node of the k-NN graph.
        reference: Optional `(y_ref, z_ref)`: labeled clean nodes of the graph
            (e.g. gathered over replicas); defaults to `(y, z)`.
        reference_adv: Optional `[N, ...]` adversarial nodes of the graph;
            defaults to `z_adv`. With it, the targets of `z_adv` are the rows
            `query_offset : query_offset + M` of the graph's adversarial nodes.
        query_offset: See `reference_adv`.

    Returns:
        `[M]` float32.
    """
    y_ref, z_ref = (y, z) if reference is None else reference
    nodes_adv = z_adv if reference_adv is None else reference_adv
    num_classes = logits_adv.shape[-1]
    targets = graph.propagate_labels(z_ref, y_ref, nodes_adv, num_classes, alpha=alpha, k=k)
    targets = targets[query_offset : query_offset + tf.shape(logits_adv)[0]]
    return _soft_cross_entropy(targets, logits_adv)


# ---------------------------------------------------------------------------
# Batch means: the functional API.
# ---------------------------------------------------------------------------


def local_compactness(z, z_adv, distance="l1", normalization=DEFAULT_NORMALIZATION):
    """Mean over examples and features of `|sg(z) - z_adv|` (or squared, `"l2"`).

    Codes are RMS-normalised first by default (`normalization="rms"`, the
    bounded form of `ADRConfig`); `normalization="none"` is the paper's.
    """
    return tf.reduce_mean(local_compactness_per_example(z, z_adv, distance, normalization))


def local_smoothness(logits, logits_adv):
    """Mean over i of `CE(softmax(sg(logits_i)), logits_adv_i)`."""
    return tf.reduce_mean(local_smoothness_per_example(logits, logits_adv))


def global_compactness(
    y,
    z,
    z_adv,
    scale=DEFAULT_LABEL_SCALE,
    method="sorted",
    normalization=DEFAULT_NORMALIZATION,
    features=None,
):
    """Mean over all pairs (i, j) of `W_ij mean_d |sg(z)_j,d - z_adv_i,d|` (d in `features`).

    Codes are RMS-normalised first by default (the bounded form of
    `ADRConfig`); `normalization="none"` is the paper's, unbounded below.
    """
    return tf.reduce_mean(
        global_compactness_per_example(
            y, z, z_adv, scale, method=method, normalization=normalization, features=features
        )
    )


def global_smoothness(y, logits, logits_adv, scale=DEFAULT_LABEL_SCALE, push=DEFAULT_PUSH):
    """Mean over i of `global_smoothness_per_example`.

    The default `push="overlap"` is the bounded form of `ADRConfig`;
    `push="cross_entropy"` is the paper's (all pairs
    `W_ij CE(softmax(sg(logits_j)), logits_adv_i)`, unbounded below).
    """
    return tf.reduce_mean(global_smoothness_per_example(y, logits, logits_adv, scale, push=push))


def conditional_entropy(logits_adv):
    """Mean entropy of the adversarial predictions."""
    return tf.reduce_mean(conditional_entropy_per_example(logits_adv))


def trades_kl(logits, logits_adv):
    """Mean over i of `KL(softmax(logits_i) || softmax(logits_adv_i))`."""
    return tf.reduce_mean(trades_kl_per_example(logits, logits_adv))


def propagate_labels(z, y, z_adv, num_classes, alpha=0.99, k=10):
    """Soft targets of the adversarial codes; see `graph.propagate_labels`."""
    return graph.propagate_labels(z, y, z_adv, num_classes, alpha=alpha, k=k)


def label_propagation(y, z, z_adv, logits_adv, alpha=0.99, k=10):
    """Mean over i of `CE(q_i, logits_adv_i)`, `q` propagated from the clean codes."""
    return tf.reduce_mean(label_propagation_per_example(y, z, z_adv, logits_adv, alpha=alpha, k=k))


# ---------------------------------------------------------------------------
# keras.losses.Loss classes for the terms that fit Keras' (y_true, y_pred)
# contract: `y_true` is the clean (target) side, `y_pred` the adversarial
# side; `call` returns per-example values that Keras reduces
# (`"sum_over_batch_size"` = the functional batch mean).
# ---------------------------------------------------------------------------


def _check_normalization(normalization):
    if normalization not in LATENT_NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {LATENT_NORMALIZATIONS}; got {normalization!r}."
        )


@keras.saving.register_keras_serializable(package="keras_adr")
class LocalCompactness(keras.losses.Loss):
    """Local compactness: `y_true` = clean latent codes, `y_pred` = adversarial ones."""

    def __init__(
        self,
        distance="l1",
        normalization=DEFAULT_NORMALIZATION,
        reduction="sum_over_batch_size",
        name="local_compactness",
        **kwargs,
    ):
        if distance not in ("l1", "l2"):
            raise ValueError(f"`distance` must be 'l1' or 'l2'; got {distance!r}.")
        _check_normalization(normalization)
        super().__init__(reduction=reduction, name=name, **kwargs)
        self.distance = distance
        self.normalization = normalization

    def call(self, y_true, y_pred):
        return local_compactness_per_example(y_true, y_pred, self.distance, self.normalization)

    def get_config(self):
        return {
            **super().get_config(),
            "distance": self.distance,
            "normalization": self.normalization,
        }


@keras.saving.register_keras_serializable(package="keras_adr")
class LocalSmoothness(keras.losses.Loss):
    """Local smoothness: `y_true` = clean logits, `y_pred` = adversarial logits."""

    def __init__(self, reduction="sum_over_batch_size", name="local_smoothness", **kwargs):
        super().__init__(reduction=reduction, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return local_smoothness_per_example(y_true, y_pred)


@keras.saving.register_keras_serializable(package="keras_adr")
class ConditionalEntropy(keras.losses.Loss):
    """Entropy of the adversarial predictions: `y_pred` = adversarial logits (y_true unused)."""

    def __init__(self, reduction="sum_over_batch_size", name="conditional_entropy", **kwargs):
        super().__init__(reduction=reduction, name=name, **kwargs)

    def call(self, y_true, y_pred):
        del y_true
        return conditional_entropy_per_example(y_pred)


@keras.saving.register_keras_serializable(package="keras_adr")
class TradesKL(keras.losses.Loss):
    """TRADES KL: `y_true` = clean logits, `y_pred` = adversarial logits."""

    def __init__(self, reduction="sum_over_batch_size", name="trades_kl", **kwargs):
        super().__init__(reduction=reduction, name=name, **kwargs)

    def call(self, y_true, y_pred):
        return trades_kl_per_example(y_true, y_pred)
