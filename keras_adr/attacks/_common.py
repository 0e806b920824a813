"""Helpers shared by the attacks: inference mode, input checks, projections."""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_adr import layers
from keras_adr.config import NORMS

ATTACK_LOSSES = ("ce", "kl")
# Smallest gradient / perturbation norm; avoids dividing by zero for
# examples whose loss is flat.
_TINY = 1e-12


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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
            or not (0 < value < np.inf)
        ):
            raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}; got {norm!r}.")
    if norm == "linf" and epsilon > 0.5 * (clip_max - clip_min):
        warnings.warn(
            f"L-inf epsilon {epsilon} is more than half the pixel range [{clip_min}, "
            f"{clip_max}]: every image can be turned into any other. Is it in pixel units of "
            "[0, 1] images (e.g. 8/255, not 8)?",
            stacklevel=3,
        )
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"`loss` must be one of {ATTACK_LOSSES}; got {loss!r}.")
    # The pixel check of the whole package: dtype, finiteness, range.
    return layers.check_pixels(tf.convert_to_tensor(x), clip_min, clip_max, name="x")


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


def _uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32):
    """Stateful `tf.random.uniform` when `seed` is None, else its stateless form."""
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=dtype)


def _normal(shape, seed, dtype=tf.float32):
    """Stateful `tf.random.normal` when `seed` is None, else its stateless form."""
    if seed is None:
        return tf.random.normal(shape, dtype=dtype)
    return tf.random.stateless_normal(shape, seed, dtype=dtype)


def _random_start(x, epsilon, norm, seed=None):
    """A uniform random point of the ball around `x`; `seed`: see `pgd`."""
    keys = [None, None] if seed is None else tf.unstack(tf.random.split(seed, 2))
    if norm == "linf":
        return x + _uniform(tf.shape(x), keys[0], -epsilon, epsilon, dtype=x.dtype)
    # Uniform in the L2 ball: a uniform direction and radius eps * U^(1/d).
    direction = _normal(tf.shape(x), keys[0], dtype=x.dtype)
    direction /= _per_example_norm(direction)
    dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
    radius = epsilon * _uniform(shape, keys[1], dtype=x.dtype) ** (1.0 / dims)
    return x + direction * radius


def _ascent_direction(grad, norm):
    if norm == "linf":
        return tf.sign(grad)
    return grad / _per_example_norm(grad)


def _per_example(mask, like):
    """Reshapes a `[B]` tensor to `[B, 1, ..., 1]` to broadcast against `like`.

    The ones come from the static rank of `like` when it is known (so the
    result has a static shape); only a `like` of unknown rank has its rank
    read at run time. `like` must have a batch axis: a scalar raises
    `ValueError` instead of tracing `tf.ones([-1])`, which fails inside a
    graph with "Fill dimensions must be >= 0".
    """
    rank = tf.TensorShape(like.shape).rank
    if rank is None:
        ones = tf.ones(tf.maximum(tf.rank(like) - 1, 0)[None], tf.int32)
    elif rank < 1:
        raise ValueError(
            f"`like` must have a batch axis [B, ...] to broadcast a per-example `[B]` tensor "
            f"against; got shape {like.shape}."
        )
    else:
        ones = tf.constant([1] * (rank - 1), tf.int32)
    return tf.reshape(mask, tf.concat([tf.shape(mask)[:1], ones], 0))


def _check_count(name, value, minimum=1):
    """Raises ValueError unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")


def _check_seed(seed):
    if (
        seed is not None
        and not tf.is_tensor(seed)
        and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)))
    ):
        raise ValueError(f"`seed` must be None or an integer; got {seed!r}.")


def _base_seed(seed):
    """An int64 scalar for stateless random ops: `seed`, or a fresh draw if None."""
    if seed is None:
        return tf.random.uniform([], 0, 2**62, dtype=tf.int64)
    return tf.cast(seed, tf.int64)


def _margin(logits, y):
    """Per-example `z_y - max_{j != y} z_j` `[B]`: > 0 iff `y` wins (ties count as wrong)."""
    logits = tf.cast(logits, tf.float32)
    z_y = tf.gather(logits, y, batch_dims=1)
    is_label = tf.cast(tf.one_hot(y, tf.shape(logits)[-1]), tf.bool)
    return z_y - tf.reduce_max(tf.where(is_label, tf.float32.min, logits), axis=-1)


def _compile_if_eager(fn):
    """`tf.function(fn)` when running eagerly (long loops), else `fn` itself."""
    return tf.function(fn) if tf.executing_eagerly() else fn
