"""The input gradient of an attack loss, safe from low-precision underflow."""

import numpy as np
import tensorflow as tf

# The largest float32 exponent a per-example gradient scale may take (2**126
# stays finite and a normal number).
_MAX_SCALE_EXPONENT = 126


def power_of_two_scale(peak):
    """Per-example `2**e` (an exact float32) with `peak * 2**e` in [0.5, 2); 1 where peak is 0."""
    exponent = tf.math.floor(tf.math.log(peak) / np.log(2.0))
    exponent = tf.where(
        peak > 0, tf.clip_by_value(-exponent, -_MAX_SCALE_EXPONENT, _MAX_SCALE_EXPONENT), 0.0
    )
    # 2**e built from its bits, so that it is exact (tf.pow may round).
    bits = tf.bitwise.left_shift(tf.cast(exponent, tf.int32) + 127, 23)
    return tf.bitcast(bits, tf.float32)


def input_gradient(model_fn, loss_fn, x):
    """Per-example losses and their input gradient, safe from float16 underflow.

    The logits are cast to float32 before `loss_fn`, and the gradient of
    the loss with respect to them is rescaled per example by a power of two
    that brings its largest entry into [0.5, 2) before it flows back through
    the model. In float32 this is exact (a power of two commutes with every
    rounding), so the result is the true gradient times a positive factor
    per example, which the sign (L-inf) and normalised (L2) steps of the
    attacks do not see. In a float16 model the unscaled gradient underflows:
    a confident example's cross-entropy gradient is `softmax - onehot`,
    about `exp(-margin)`, below float16's smallest value (6e-8) once the
    logit margin passes 17, so its input gradient is exactly zero and PGD
    does not move it. Scaling per example instead of one loss scale for the
    batch cannot overflow either.

    Measured (`benchmarks/precision_attack.py`, issue 14): on `small_cnn`
    trained one epoch on 20,000 Fashion-MNIST images (clean, and PGD-AT),
    no test image had a zero float16 input gradient and PGD-20 accuracy in
    float16 and bfloat16 was within 0.2 points of float32, with and
    without the scaling: at such margins the float32 loss alone is enough.
    The scaling costs one `[B, K]` gradient, changes nothing there, and is
    what keeps confident examples attackable (`tests/test_precision.py`
    builds one). Attacking a float32 copy of the model instead would give up
    the low-precision speed that the training attack is there for.

    Args:
        model_fn: Callable images -> logits (of any float dtype).
        loss_fn: Callable float32 logits `[B, K]` -> per-example losses `[B]`.
        x: Images `[B, ...]`.

    Returns:
        `(logits, losses, grad)`: float32 logits, the losses `[B]`, and the
        input gradient of their sum up to a positive factor per example
        (zero where the loss does not depend on the input).
    """
    logits, losses, grad, _ = _scaled_input_gradient(model_fn, loss_fn, x)
    return logits, losses, grad


def _scaled_input_gradient(model_fn, loss_fn, x):
    """`input_gradient` and its per-example power-of-two scale `[B, 1]` (grad / scale is exact)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model_fn(x), tf.float32)
    with tf.GradientTape() as head:
        head.watch(logits)
        losses = loss_fn(logits)
        total = tf.reduce_sum(losses)
    logit_grad = head.gradient(total, logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    axes = list(range(1, len(logit_grad.shape)))
    scale = power_of_two_scale(tf.reduce_max(tf.abs(logit_grad), axis=axes, keepdims=True))
    grad = tape.gradient(
        logits,
        x,
        output_gradients=logit_grad * scale,
        # A model may cut its input off the graph (stop_gradient, rounding):
        # its gradient is then zero, not an error.
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return logits, losses, grad, scale


def eot_input_gradient(model_fn, loss_fn, x, iterations):
    """`input_gradient` averaged over `iterations` calls of a randomized `model_fn` (EOT).

    Expectation over Transformation (Athalye et al., 2018), as in
    AutoAttack's rand version: each call samples the model's randomness
    anew; the gradients are averaged (each with its power-of-two scale
    divided back out, exact in float32, so that every sample counts the
    same), and so are the logits and the losses (AutoAttack keeps the last
    sample's). The average is rescaled by a power of two per example, so
    that its largest entry is in [0.5, 2) and the normalised L2 step is as
    accurate as with one sample. With `iterations=1` this is
    `input_gradient` itself.

    Args:
        model_fn: Callable images -> logits, possibly random.
        loss_fn: Callable float32 logits `[B, K]` -> per-example losses `[B]`.
        x: Images `[B, ...]`.
        iterations: Number of samples, an integer >= 1.

    Returns:
        `(logits, losses, grad)` as `input_gradient`, averaged over the
        samples; `grad` up to a positive factor per example.
    """
    if iterations == 1:
        return input_gradient(model_fn, loss_fn, x)

    def sample():
        logits, losses, grad, scale = _scaled_input_gradient(model_fn, loss_fn, x)
        # `scale` is `[B, 1]`: the gradient itself, so that one sample weighs as much as another.
        return logits, losses, grad / tf.reshape(scale, [-1] + [1] * (len(grad.shape) - 1))

    def body(i, logits_sum, losses_sum, grad_sum):
        logits, losses, grad = sample()
        return i + 1, logits_sum + logits, losses_sum + losses, grad_sum + grad

    _, logits_sum, losses_sum, grad_sum = tf.while_loop(
        lambda i, *_: i < iterations, body, (tf.constant(1), *sample()), parallel_iterations=1
    )
    count = float(iterations)
    grad = grad_sum / count
    axes = list(range(1, len(grad.shape)))
    grad *= power_of_two_scale(tf.reduce_max(tf.abs(grad), axis=axes, keepdims=True))
    return logits_sum / count, losses_sum / count, grad
