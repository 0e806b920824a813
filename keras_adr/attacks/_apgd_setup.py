"""APGD's setup: what Auto-PGD fixes before its loop (Croce & Hein, ICML 2020).

- The per-example objective APGD maximises (`_apgd_objective`): the
  cross-entropy (targeted: minus the cross-entropy to the target), the
  difference of logits ratio DLR and the targeted DLR loss.
- The step-size schedule: the checkpoints `apgd_checkpoints(steps)` at which
  an example's step size may be halved.
- The random start in the L-inf ball or on the L2 sphere (`_apgd_start`).
- The argument checks of `apgd` (`_validate_apgd`) and the check that the
  model has enough classes for the loss (`_check_num_classes`).

The attack loop and the public `apgd` / `apgd_dlr_targeted` are in
`keras_adr.attacks.apgd`, which re-exports these names.
"""

import numpy as np
import tensorflow as tf

from keras_adr.attacks._common import _normal, _per_example_norm, _uniform, _validate

APGD_LOSSES = ("ce", "dlr")
# Checkpoints: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
_APGD_FIRST_CHECKPOINT = 0.22
_APGD_CHECKPOINT_SHRINK = 0.03
_APGD_MIN_CHECKPOINT_GAP = 0.06
# Added to the DLR denominator (as in the paper) so that it is never zero.
_DLR_TINY = 1e-12


def apgd_checkpoints(steps):
    """The iterations `w_j = ceil(p_j * steps)` at which APGD may halve its step.

    `p_0 = 0`, `p_1 = 0.22` and `p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`
    (Croce & Hein 2020). Checkpoints at or after the last step are dropped:
    they could not change the result.

    Args:
        steps: Number of iterations, an integer >= 1.

    Returns:
        A sorted tuple of distinct integers in `[1, steps)`.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}.")
    fractions = [0.0, _APGD_FIRST_CHECKPOINT]
    while True:
        gap = max(fractions[-1] - fractions[-2] - _APGD_CHECKPOINT_SHRINK, _APGD_MIN_CHECKPOINT_GAP)
        if fractions[-1] + gap > 1.0:
            break
        fractions.append(fractions[-1] + gap)
    # Rounding first keeps 0.41 * 100 (= 41.000000000000004) at 41.
    points = {int(np.ceil(round(p * steps, 6))) for p in fractions[1:]}
    return tuple(sorted(w for w in points if 0 < w < steps))


def _apgd_start(x, epsilon, norm, seed):
    """A random starting point: uniform in the L-inf ball, on the L2 sphere.

    `seed` is None (stateful random ops) or an int64 `[2]` stateless seed.
    """
    shape = tf.shape(x)
    if norm == "linf":
        return x + epsilon * _uniform(shape, seed, -1.0, 1.0, dtype=x.dtype)
    noise = _normal(shape, seed, dtype=x.dtype)
    return x + epsilon * noise / _per_example_norm(noise)


def _apgd_objective(logits, y, target, loss, targeted):
    """Per-example loss `[B]` that APGD maximises."""
    logits = tf.cast(logits, tf.float32)
    if loss == "ce":
        if targeted:
            return -tf.nn.sparse_softmax_cross_entropy_with_logits(target, logits)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
    # Difference of logits ratio (Croce & Hein 2020, Eq. 5 and 6).
    top = tf.math.top_k(logits, k=4 if targeted else 3).values
    z_y = tf.gather(logits, y, batch_dims=1)
    if targeted:
        z_t = tf.gather(logits, target, batch_dims=1)
        scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_TINY
        return -(z_y - z_t) / scale
    is_label = tf.cast(tf.one_hot(y, tf.shape(logits)[-1]), tf.bool)
    z_other = tf.reduce_max(tf.where(is_label, tf.float32.min, logits), axis=-1)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + _DLR_TINY)


def _validate_apgd(
    x,
    y,
    *,
    epsilon,
    steps,
    norm,
    loss,
    targeted,
    num_targets,
    restarts,
    rho,
    eot_iterations,
    clip_min,
    clip_max,
    seed,
):
    if loss not in APGD_LOSSES:
        raise ValueError(f"`loss` must be one of {APGD_LOSSES} for APGD; got {loss!r}.")
    if not isinstance(targeted, (bool, np.bool_)):
        raise ValueError(f"`targeted` must be a bool; got {targeted!r}.")
    for name, value in (
        ("restarts", restarts),
        ("num_targets", num_targets),
        ("eot_iterations", eot_iterations),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.number)) or not 0 < rho <= 1:
        raise ValueError(f"`rho` must be a number in (0, 1]; got {rho!r}.")
    if (
        seed is not None
        and not tf.is_tensor(seed)
        and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)))
    ):
        raise ValueError(f"`seed` must be None or an integer; got {seed!r}.")
    if y is None:
        raise ValueError("`y` (integer labels) is required by APGD.")
    # The shared checks of `pgd`; APGD's initial step is 2 * epsilon.
    return _validate(
        x,
        epsilon=epsilon,
        step_size=epsilon,
        steps=steps,
        norm=norm,
        loss="ce",
        clip_min=clip_min,
        clip_max=clip_max,
    )


def _check_num_classes(num_classes, loss, targeted, num_targets):
    """Raises ValueError if the logits have too few classes for the attack."""
    if num_classes is None:
        return  # Unknown until run time: top_k / gather fail there instead.
    if loss == "dlr" and not targeted and num_classes < 3:
        raise ValueError(
            f"The DLR loss needs at least 3 classes (it divides by z_pi1 - z_pi3); the model "
            f"outputs {num_classes} logits. Use loss='ce'."
        )
    if loss == "dlr" and targeted and num_classes < 4:
        raise ValueError(
            "The targeted DLR loss needs at least 4 classes (it divides by "
            f"z_pi1 - (z_pi3 + z_pi4) / 2); the model outputs {num_classes} logits. Use "
            "loss='ce' (targeted) or the untargeted DLR loss."
        )
    if targeted and num_targets > num_classes - 1:
        raise ValueError(
            f"`num_targets` ({num_targets}) must be at most the number of wrong classes "
            f"({num_classes - 1})."
        )
