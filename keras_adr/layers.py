"""Keras layers of keras-adr.

`Latent` marks the latent code `z` of a classifier: `ADRModel` finds it by
type, so a model needs no naming convention. `Standardize` normalises
pixels inside the model, so that everything outside it sees [0, 1] pixels.
`PixelRange` (and `check_pixels`, the function it wraps) checks that
images are finite pixels in `[clip_min, clip_max]`: the one check that the
attacks, the evaluation, the exported signatures and the serving helpers
use.
"""

import math

import keras
import numpy as np
import tensorflow as tf

# What to do about pixels outside the range, unless the caller knows better.
DEFAULT_PIXEL_HINT = "Scale uint8 images by 1/255 and keep any normalisation inside the model."


def check_pixels(images, clip_min=0.0, clip_max=1.0, *, name="images", hint=DEFAULT_PIXEL_HINT):
    """Checks that `images` are finite floats in `[clip_min, clip_max]`.

    Eagerly (numpy arrays or eager tensors) a violation raises `ValueError`
    at once and `images` is returned as given. Inside a graph
    (`tf.function`, a SavedModel signature, `fit`) the values are known only
    at run time: the checks become `tf.debugging` assertions, which fail
    with `tf.errors.InvalidArgumentError`, and the returned tensor depends
    on them. The finiteness check runs first, so a NaN is reported as such
    and not as out of range. Either way the message names `name`, the range
    and what was received.

    Args:
        images: Float images of any shape (an empty batch passes).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        name: How the message names `images` (e.g. the caller's argument).
        hint: What the message tells the user to do about out-of-range
            pixels.

    Returns:
        `images` eagerly; in a graph, a tensor equal to `images` that runs
        the assertions.

    Raises:
        ValueError: For non-float images, or (eagerly) non-finite or
            out-of-range values.
    """
    _check_range_arguments(clip_min, clip_max)
    values = images if tf.is_tensor(images) else np.asarray(images)
    if tf.is_tensor(values):
        floating, dtype = values.dtype.is_floating, values.dtype.name
    else:
        floating, dtype = np.issubdtype(values.dtype, np.floating), str(values.dtype)
    if not floating:
        raise ValueError(
            f"`{name}` must be floating-point pixels in [{clip_min:g}, {clip_max:g}]; received "
            f"dtype {dtype}. Convert uint8 images with `tf.cast(images, tf.float32) / 255`."
        )
    bounds = f"[clip_min, clip_max] = [{clip_min:g}, {clip_max:g}]"
    if not tf.is_tensor(values) or tf.executing_eagerly():
        values = tf.convert_to_tensor(values)
        if not tf.size(values):
            return images
        non_finite = int(tf.math.count_nonzero(~tf.math.is_finite(values)))
        if non_finite:
            raise ValueError(
                f"`{name}` must be finite pixels in {bounds}; received {non_finite} non-finite "
                "values (NaN or inf)."
            )
        low, high = float(tf.reduce_min(values)), float(tf.reduce_max(values))
        if low < clip_min or high > clip_max:
            raise ValueError(
                f"`{name}` must lie in {bounds}; received values in [{low:.4g}, {high:.4g}]. "
                + hint
            )
        return images
    values = tf.debugging.assert_all_finite(
        values, f"`{name}` has non-finite values (NaN or inf); pixels must be finite, in {bounds}"
    )
    in_range = tf.debugging.Assert(
        tf.logical_and(
            tf.reduce_all(values >= tf.cast(clip_min, values.dtype)),
            tf.reduce_all(values <= tf.cast(clip_max, values.dtype)),
        ),
        [
            f"`{name}` must lie in {bounds}. {hint} Received min and max:",
            tf.reduce_min(values),
            tf.reduce_max(values),
        ],
    )
    with tf.control_dependencies([in_range]):
        return tf.identity(values)


def _check_range_arguments(clip_min, clip_max):
    for arg, value in (("clip_min", clip_min), ("clip_max", clip_max)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value)
        ):
            raise ValueError(f"`{arg}` must be a finite number; got {value!r}.")
    if not clip_min < clip_max:
        raise ValueError(f"`clip_min` ({clip_min}) must be smaller than `clip_max` ({clip_max}).")


@keras.saving.register_keras_serializable(package="keras_adr")
class PixelRange(keras.layers.Layer):
    """Passes images through unchanged after checking their pixel range.

    Put it first in a model (or in front of an exported signature) to fail
    loudly on images that are not finite floats in `[clip_min, clip_max]`,
    e.g. uint8 pixels that were not divided by 255:

    ```python
    inputs = keras.Input((28, 28, 1))
    x = keras_adr.layers.PixelRange()(inputs)
    ```

    Called eagerly it raises `ValueError`; inside `fit`, `predict`, a
    `tf.function` or a SavedModel it fails with
    `tf.errors.InvalidArgumentError`. Both messages say what was received.
    See `check_pixels`, which it wraps.

    Args:
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
    """

    def __init__(self, clip_min=0.0, clip_max=1.0, **kwargs):
        kwargs.setdefault("autocast", False)  # Check the pixels as they come.
        super().__init__(**kwargs)
        _check_range_arguments(clip_min, clip_max)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.supports_masking = True

    def call(self, inputs):
        return check_pixels(inputs, self.clip_min, self.clip_max, name=self.name)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "clip_min": self.clip_min, "clip_max": self.clip_max}


@keras.saving.register_keras_serializable(package="keras_adr")
class Latent(keras.layers.Layer):
    """Identity layer whose output is the latent code `z = g(x)` of ADR.

    Put it between the feature extractor and the classifier head:

    ```python
    z = keras_adr.layers.Latent()(keras.layers.Flatten()(features))
    logits = keras.layers.Dense(10)(z)
    ```

    It has no weights and changes nothing in the forward pass; `ADRModel`
    uses its output as `z`. A model must contain exactly one.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="keras_adr")
class Standardize(keras.layers.Normalization):
    """Per-channel `(x - mean) / std` inside the model: a `keras.layers.Normalization`.

    Keeps normalisation out of the data pipeline, so that attacks, epsilon and
    exported models all work on raw pixels in [0, 1]. It is a
    `keras.layers.Normalization` over the last axis whose statistics are
    always its non-trainable weights (`mean`, `variance` = std², `count`),
    given as constants or computed by `adapt`, and read at every call (so
    `set_weights` and checkpoints take effect at once). Models saved before
    it was a `Normalization` (weights `mean` and `std`) load unchanged.

    Args:
        mean: Per-channel means (a number or a sequence), or None (0 until
            `adapt`).
        std: Per-channel standard deviations (> 0), or None (1 until `adapt`).
        **kwargs: Layer arguments (`name`, `dtype`, ...).
    """

    def __init__(self, mean=None, std=None, **kwargs):
        # Normalization's own arguments: fixed here (the statistics are
        # always weights, of the last axis).
        for name in ("axis", "variance", "invert"):
            if kwargs.pop(name, None) not in (None, -1, [-1], (-1,), False):
                raise ValueError(
                    f"Standardize takes `mean` and `std` (per channel, last axis), not "
                    f"`{name}`; use keras.layers.Normalization for other axes."
                )
        if std is not None and any(s <= 0 for s in _as_list(std)):
            raise ValueError(f"`std` must be > 0; got {std!r}.")
        super().__init__(axis=-1, **kwargs)
        self._initial = (mean, std)

    def build(self, input_shape):
        super().build(input_shape)
        channels = input_shape[-1]
        mean, std = self._initial
        self.adapt_mean.assign(_constant(mean, 0.0, channels))
        self.adapt_variance.assign([s * s for s in _constant(std, 1.0, channels)])
        self.finalize_state()

    @property
    def std(self):
        """The per-channel standard deviations, `sqrt(variance)`."""
        return keras.ops.sqrt(self.adapt_variance)

    def adapt(self, data, max_batches=None):
        """Sets mean and std from images (or `(images, labels)` batches).

        Args:
            data: A `tf.data.Dataset` of image batches or of `(images,
                labels)`, or an array of images.
            max_batches: Use at most this many batches.
        """
        import numpy as np

        if not self.built:
            raise ValueError("Standardize.adapt needs a built layer: use it in a model first.")
        channels = self.adapt_mean.shape[0]
        batches = [data] if isinstance(data, np.ndarray) else data
        count, total, total_sq = 0, 0.0, 0.0
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = np.asarray(images, np.float64).reshape(-1, channels)
            count += len(images)
            total = total + images.sum(0)
            total_sq = total_sq + (images**2).sum(0)
        if not count:
            raise ValueError("Standardize.adapt got no images.")
        mean = total / count
        std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean**2, 0.0)), 1e-6)
        self.adapt_mean.assign(mean.astype("float32"))
        self.adapt_variance.assign((std**2).astype("float32"))
        self.count.assign(count)
        self.finalize_state()

    def call(self, inputs):
        # The variables, not Normalization's snapshot of them (`finalize_state`),
        # and in the inputs' dtype, as before Standardize was a Normalization.
        # The `[C]` statistics broadcast over the last axis.
        mean = keras.ops.cast(self.adapt_mean, inputs.dtype)
        return (inputs - mean) / keras.ops.cast(self.std, inputs.dtype)

    def load_own_variables(self, store):
        if len(store.keys()) == 2:
            # Saved before Standardize was a Normalization: weights mean, std.
            self.adapt_mean.assign(store["0"])
            self.adapt_variance.assign(keras.ops.square(store["1"]))
            self.finalize_state()
            return
        super().load_own_variables(store)

    def get_config(self):
        # The Layer's config and mean/std, as before: not Normalization's
        # axis/variance/invert, which Standardize fixes.
        config = keras.layers.Layer.get_config(self)
        mean, std = self._initial
        if self.built:  # adapted values travel with the config as well as the weights
            mean = keras.ops.convert_to_numpy(self.adapt_mean).tolist()
            std = keras.ops.convert_to_numpy(self.std).tolist()
        return {**config, "mean": _as_list(mean), "std": _as_list(std)}


def _as_list(value):
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]


def _constant(value, default, channels):
    values = _as_list(value) or [default]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"Standardize got {len(values)} statistics for {channels} channels.")
    return values
