"""White-box evasion attacks as pure TensorFlow functions.

Every attack takes `model_fn`, a callable mapping images to logits. A Keras
model or layer is always called with `training=False`, so an attack never
updates BatchNorm statistics nor samples dropout masks. Plain callables are
called as they are: the caller is responsible for inference mode.

The attacks run eagerly or inside `tf.function` (the loops are
`tf.while_loop`s), work on any batch size, and return images inside the
epsilon-ball around `x` and inside `[clip_min, clip_max]`, with no gradient
flowing back to `x`.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_adr.config import NORMS

ATTACK_LOSSES = ("ce", "kl")
# Smallest gradient / perturbation norm; avoids dividing by zero for
# examples whose loss is flat.
_TINY = 1e-12
# TRADES starts its attack at x + 0.001 * N(0, 1) (Zhang et al. 2019).
_TRADES_START_STD = 0.001


def inference_fn(model_fn):
    """Wraps a Keras model or layer so that it runs in inference mode."""
    if isinstance(model_fn, keras.layers.Layer):
        model = model_fn
        return lambda images: model(images, training=False)
    if not callable(model_fn):
        raise ValueError(f"`model_fn` must be callable (images -> logits); got {model_fn!r}.")
    return model_fn


def _validate(x, *, epsilon, step_size, steps, norm, loss, clip_min, clip_max):
    for name, value in (("epsilon", epsilon), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
            raise ValueError(f"`{name}` must be a number > 0; got {value!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}; got {norm!r}.")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"`loss` must be one of {ATTACK_LOSSES}; got {loss!r}.")
    if not clip_min < clip_max:
        raise ValueError(f"`clip_min` ({clip_min}) must be smaller than `clip_max` ({clip_max}).")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(
            f"`x` must be floating-point images in [{clip_min}, {clip_max}]; got dtype "
            f"{x.dtype.name}. Convert uint8 images with `tf.cast(x, tf.float32) / 255`."
        )
    if tf.executing_eagerly():
        low, high = float(tf.reduce_min(x)), float(tf.reduce_max(x))
        if low < clip_min or high > clip_max:
            raise ValueError(
                f"`x` must lie in [clip_min, clip_max] = [{clip_min}, {clip_max}]; its values "
                f"span [{low:.4g}, {high:.4g}]. Scale images to [0, 1] and keep any "
                "normalisation inside the model."
            )
        return x
    # Inside a graph the values are unknown until run time.
    with tf.control_dependencies([
        tf.debugging.assert_greater_equal(
            x, tf.cast(clip_min, x.dtype),
            message=f"attack input `x` has values below clip_min={clip_min}"),
        tf.debugging.assert_less_equal(
            x, tf.cast(clip_max, x.dtype),
            message=f"attack input `x` has values above clip_max={clip_max}"),
    ]):
        return tf.identity(x)


def _per_example_norm(t, keepdims=True):
    axes = list(range(1, len(t.shape)))
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=keepdims) + _TINY)


def _project(x_adv, x, epsilon, norm, clip_min, clip_max):
    """Projects onto the epsilon-ball around `x`, then onto the pixel range.

    Clipping to the pixel range after the L2 projection can only shorten the
    perturbation, so the result stays in both sets.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -epsilon, epsilon)
    else:
        delta *= tf.minimum(1.0, epsilon / _per_example_norm(delta))
    return tf.clip_by_value(x + delta, clip_min, clip_max)


def _random_start(x, epsilon, norm):
    if norm == "linf":
        return x + tf.random.uniform(tf.shape(x), -epsilon, epsilon, dtype=x.dtype)
    # Uniform in the L2 ball: a uniform direction and radius eps * U^(1/d).
    direction = tf.random.normal(tf.shape(x), dtype=x.dtype)
    direction /= _per_example_norm(direction)
    dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
    radius = epsilon * tf.random.uniform(shape, dtype=x.dtype) ** (1.0 / dims)
    return x + direction * radius


def _ascent_direction(grad, norm):
    if norm == "linf":
        return tf.sign(grad)
    return grad / _per_example_norm(grad)


def _loss_fn(model_fn, x, y, loss):
    """Per-batch summed loss to maximise (sum: each example's gradient is its own)."""
    if loss == "ce":
        labels = tf.cast(y, tf.int32)

        def ce(x_adv):
            logits = tf.cast(model_fn(x_adv), tf.float32)
            return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

        return ce
    clean_probs = tf.stop_gradient(tf.nn.softmax(tf.cast(model_fn(x), tf.float32)))
    clean_log_probs = tf.math.log(clean_probs + _TINY)

    def kl(x_adv):
        log_probs = tf.nn.log_softmax(tf.cast(model_fn(x_adv), tf.float32))
        return tf.reduce_sum(clean_probs * (clean_log_probs - log_probs))

    return kl


def pgd(model_fn, x, y, *, epsilon, step_size, steps, norm="linf", random_start=True,
        loss="ce", clip_min=0.0, clip_max=1.0):
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

    Returns:
        Adversarial images, same shape and dtype as `x`, without gradient.

    Raises:
        ValueError: For an invalid argument, or (eagerly) `x` outside
            `[clip_min, clip_max]`; inside a graph an out-of-range `x` fails
            at run time with `InvalidArgumentError`.
    """
    x = _validate(x, epsilon=epsilon, step_size=step_size, steps=steps, norm=norm, loss=loss,
                  clip_min=clip_min, clip_max=clip_max)
    if loss == "ce" and y is None:
        raise ValueError("`y` (integer labels) is required with loss='ce'.")
    model_fn = inference_fn(model_fn)
    x = tf.stop_gradient(x)
    objective = _loss_fn(model_fn, x, y, loss)

    if loss == "kl":
        x_adv = x + _TRADES_START_STD * tf.random.normal(tf.shape(x), dtype=x.dtype)
    elif random_start:
        x_adv = _random_start(x, epsilon, norm)
    else:
        x_adv = x
    x_adv = _project(x_adv, x, epsilon, norm, clip_min, clip_max)

    def step(i, x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            value = objective(x_adv)
        grad = tape.gradient(value, x_adv)
        x_adv = x_adv + step_size * _ascent_direction(grad, norm)
        return i + 1, _project(x_adv, x, epsilon, norm, clip_min, clip_max)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), x_adv),
                             parallel_iterations=1)
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
    return pgd(model_fn, x, y, epsilon=epsilon, step_size=epsilon, steps=1, norm=norm,
               random_start=False, loss=loss, clip_min=clip_min, clip_max=clip_max)
