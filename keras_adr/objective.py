"""The ADR training objective's terms over one batch: `ADRBatch`, `Reference`, `TERMS`.

`TERMS` maps every term of the training objective to one function of one
signature, `term(batch, config) -> [M]` per-example values, over an
`ADRBatch` (clean and adversarial codes and logits, labels, and the
`Reference` set the pairwise terms compare with) and an `ADRConfig`.
`ADRMixin` sums `TERMS[name]` for the enabled terms with their weights. The
terms themselves, as functions of explicit tensors, are in
`keras_adr.losses`.
"""

from typing import NamedTuple

import tensorflow as tf

from keras_adr import graph
from keras_adr.losses import (
    conditional_entropy_per_example,
    global_compactness_per_example,
    global_smoothness_per_example,
    label_propagation_per_example,
    local_compactness_per_example,
    local_smoothness_per_example,
    sample_features,
    trades_kl_per_example,
)


class Reference(NamedTuple):
    """The clean examples j that the pairwise terms compare each example i with.

    In one process it is the batch itself; under a distribution strategy with
    `pairwise_scope="global"` it is the global batch gathered across replicas
    (stop-gradient), so that every replica computes what one device would.

    Attributes:
        labels: `[N]` int32 labels.
        z: `[N, ...]` clean latent codes.
        logits: `[N, C]` clean logits.
        z_adv: `[N, ...]` adversarial latent codes (nodes of the
            label-propagation graph), or None when no term needs them.
        offset: Row of the batch's first example in the reference.
    """

    labels: tf.Tensor
    z: tf.Tensor
    logits: tf.Tensor
    z_adv: tf.Tensor = None
    offset: tf.Tensor = 0


class ADRBatch(NamedTuple):
    """One batch as the terms of the objective see it.

    Attributes:
        labels: `[M]` int32 labels.
        logits: `[M, C]` clean logits.
        z: `[M, ...]` clean latent codes.
        logits_adv: `[M, C]` adversarial logits (None for the `standard`
            objective).
        z_adv: `[M, ...]` adversarial latent codes (None likewise).
        reference: The `Reference` of the pairwise terms; None means the
            batch itself (see `resolved_reference`).
        seed: `[2]` int seed of the step's random choices (the features of a
            sampled global compactness), the same on every replica; None
            where no term samples.
    """

    labels: tf.Tensor
    logits: tf.Tensor
    z: tf.Tensor
    logits_adv: tf.Tensor = None
    z_adv: tf.Tensor = None
    reference: Reference = None
    seed: tf.Tensor = None

    @property
    def resolved_reference(self):
        """`reference`, or the batch itself as its own reference."""
        if self.reference is not None:
            return self.reference
        return Reference(self.labels, self.z, self.logits, self.z_adv, 0)


def _cross_entropy(logits, labels):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32))


def _global_compactness_term(batch, config):
    ref = batch.resolved_reference
    features = None
    if config.samples_features:
        if batch.seed is None:
            raise ValueError(
                "global_compactness_features < 1 samples features each step: the ADRBatch "
                "needs a `seed` (ADRMixin passes one), or set global_compactness_features=1."
            )
        num_features = tf.shape(graph.flatten_batch(batch.z_adv))[1]
        features = sample_features(num_features, config.global_compactness_features, batch.seed)
    return global_compactness_per_example(
        batch.labels,
        None,
        batch.z_adv,
        config.label_scale,
        reference=(ref.labels, ref.z),
        normalization=config.latent_normalization,
        features=features,
    )


def _global_smoothness_term(batch, config):
    ref = batch.resolved_reference
    return global_smoothness_per_example(
        batch.labels,
        None,
        batch.logits_adv,
        config.label_scale,
        reference=(ref.labels, ref.logits),
        push=config.smoothness_push,
    )


def _label_propagation_term(batch, config):
    ref = batch.resolved_reference
    return label_propagation_per_example(
        batch.labels,
        batch.z,
        batch.z_adv,
        batch.logits_adv,
        alpha=config.propagation_alpha,
        k=config.propagation_neighbors,
        reference=(ref.labels, ref.z),
        reference_adv=ref.z_adv,
        query_offset=ref.offset,
    )


# Every term of the objective: `term(batch, config) -> [M]` per-example
# values, `config` an `ADRConfig`. Which terms a run uses, and their weights,
# come from `ADRConfig` (see `ADRMixin`).
TERMS = {
    "ce": lambda batch, config: _cross_entropy(batch.logits, batch.labels),
    "adv_ce": lambda batch, config: _cross_entropy(batch.logits_adv, batch.labels),
    "trades_kl": lambda batch, config: trades_kl_per_example(batch.logits, batch.logits_adv),
    "local_compactness": lambda batch, config: local_compactness_per_example(
        batch.z, batch.z_adv, config.compactness_distance, config.latent_normalization
    ),
    "local_smoothness": lambda batch, config: local_smoothness_per_example(
        batch.logits, batch.logits_adv
    ),
    "global_compactness": _global_compactness_term,
    "global_smoothness": _global_smoothness_term,
    "conditional_entropy": lambda batch, config: conditional_entropy_per_example(batch.logits_adv),
    "label_propagation": _label_propagation_term,
}
# The terms that compare an example with the whole `Reference`.
PAIRWISE_TERMS = ("global_compactness", "global_smoothness", "label_propagation")
