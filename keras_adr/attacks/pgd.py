"""PGD (Madry et al. 2018), the TRADES KL attack, and FGSM."""

import tensorflow as tf

from keras_adr.attacks._common import (
    _TINY,
    _ascent_direction,
    _normal,
    _project,
    _random_start,
    _validate,
    inference_fn,
)
from keras_adr.attacks._gradient import input_gradient

# TRADES starts its attack at x + 0.001 * N(0, 1) (Zhang et al. 2019).
_TRADES_START_STD = 0.001


def _loss_fn(model_fn, x, y, loss):
    """Per-example loss of the float32 logits, to maximise."""
    if loss == "ce":
        labels = tf.cast(y, tf.int32)
        return lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    clean_probs = tf.stop_gradient(tf.nn.softmax(tf.cast(model_fn(x), tf.float32)))
    clean_log_probs = tf.math.log(clean_probs + _TINY)

    def kl(logits):
        return tf.reduce_sum(clean_probs * (clean_log_probs - tf.nn.log_softmax(logits)), axis=-1)

    return kl


def pgd(
    model_fn,
    x,
    y,
    *,
    epsilon,
    step_size,
    steps,
    norm="linf",
    random_start=True,
    loss="ce",
    clip_min=0.0,
    clip_max=1.0,
    unroll=False,
    seed=None,
):
    """Projected gradient descent (Madry et al. 2018), or the TRADES KL attack.

    Args:
        model_fn: Callable images -> logits; Keras models run with
            `training=False`.
        x: Float images `[B, ...]` inside `[clip_min, clip_max]`.
        y: Integer labels `[B]` (ignored by `loss="kl"`, may be None then).
        epsilon: Radius of the perturbation ball, > 0.
        step_size: Ascent step size, > 0.
        steps: Number of ascent steps, >= 1.
        norm: `"linf"` (signed-gradient steps) or `"l2"` (normalised steps).
        random_start: Start from a uniform random point of the ball. Ignored
            by `loss="kl"`, which starts at `x + 0.001 * N(0, 1)` as TRADES.
        loss: `"ce"`: maximise cross-entropy to `y`; `"kl"`: maximise
            `KL(p(x) || p(x_adv))` (the TRADES attack).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        unroll: Trace the steps one after another instead of in a
            `tf.while_loop`: the same computation in a graph without a loop,
            larger and slower to compile. On CPUs TensorFlow's oneDNN graph
            rewrite sometimes leaves the max-pool gradients inside a loop on
            TensorFlow's own kernel, several times slower in bfloat16
            (docs/mixed-precision.md, "Slow compilations"); without the loop it rewrites
            them all.
        seed: None: the random start comes from TensorFlow's stateful
            generator (seeded by `tf.random.set_seed`). A `[2]` integer
            tensor: from stateless random ops keyed by it, so the same seed
            gives the same start whatever ran before (a resumed training run
            repeats the starts of an uninterrupted one).

    Returns:
        Adversarial images, same shape and dtype as `x`, without gradient.

    Raises:
        ValueError: For an invalid argument, or (eagerly) `x` outside
            `[clip_min, clip_max]`; inside a graph an out-of-range `x` fails
            at run time with `InvalidArgumentError`.
    """
    x = _validate(
        x,
        epsilon=epsilon,
        step_size=step_size,
        steps=steps,
        norm=norm,
        loss=loss,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    if loss == "ce" and y is None:
        raise ValueError("`y` (integer labels) is required with loss='ce'.")
    if x.shape[0] == 0:
        return tf.stop_gradient(x)  # Nothing to attack (and some kernels reject empty batches).
    model_fn = inference_fn(model_fn)
    x = tf.stop_gradient(x)
    objective = _loss_fn(model_fn, x, y, loss)

    if seed is not None:
        seed = tf.cast(seed, tf.int64)
    if loss == "kl":
        x_adv = x + _TRADES_START_STD * _normal(tf.shape(x), seed, dtype=x.dtype)
    elif random_start:
        x_adv = _random_start(x, epsilon, norm, seed)
    else:
        x_adv = x
    x_adv = _project(x_adv, x, epsilon, norm, clip_min, clip_max)

    def step(i, x_adv):
        # Up to a positive factor per example, which the step does not see.
        _, _, grad = input_gradient(model_fn, objective, x_adv)
        x_adv = x_adv + step_size * _ascent_direction(grad, norm)
        return i + 1, _project(x_adv, x, epsilon, norm, clip_min, clip_max)

    if unroll:
        for i in range(steps):
            _, x_adv = step(i, x_adv)
    else:
        _, x_adv = tf.while_loop(
            lambda i, _: i < steps, step, (tf.constant(0), x_adv), parallel_iterations=1
        )
    return tf.stop_gradient(x_adv)


def fgsm(model_fn, x, y, *, epsilon, norm="linf", loss="ce", clip_min=0.0, clip_max=1.0):
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of size epsilon.

    Args:
        model_fn: Callable images -> logits; Keras models run with
            `training=False`.
        x: Float images `[B, ...]` inside `[clip_min, clip_max]`.
        y: Integer labels `[B]` (ignored by `loss="kl"`).
        epsilon: Radius of the perturbation ball (and the step size), > 0.
        norm: `"linf"` (FGSM) or `"l2"` (fast gradient method).
        loss: `"ce"` or `"kl"`, as in `pgd`.
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.

    Returns:
        Adversarial images without gradient.

    Raises:
        ValueError: For an invalid argument, as `pgd`.
    """
    return pgd(
        model_fn,
        x,
        y,
        epsilon=epsilon,
        step_size=epsilon,
        steps=1,
        norm=norm,
        random_start=False,
        loss=loss,
        clip_min=clip_min,
        clip_max=clip_max,
    )
