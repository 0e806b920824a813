"""Keras layers of keras-adr.

`Latent` marks the latent code `z` of a classifier: `ADRModel` finds it by
type, so a model needs no naming convention. `Standardize` normalises
pixels inside the model, so that everything outside it sees [0, 1] pixels.
"""

import keras


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
class Standardize(keras.layers.Layer):
    """Per-channel `(x - mean) / std` inside the model.

    Keeps normalisation out of the data pipeline, so that attacks, epsilon and
    exported models all work on raw pixels in [0, 1]. The statistics are
    non-trainable weights, given as constants or computed by `adapt`.

    Args:
        mean: Per-channel means (a number or a sequence), or None (0 until
            `adapt`).
        std: Per-channel standard deviations (> 0), or None (1 until `adapt`).
    """

    def __init__(self, mean=None, std=None, **kwargs):
        super().__init__(**kwargs)
        if std is not None and any(s <= 0 for s in _as_list(std)):
            raise ValueError(f"`std` must be > 0; got {std!r}.")
        self._initial = (mean, std)

    def build(self, input_shape):
        channels = input_shape[-1]
        mean, std = self._initial
        self.mean = self.add_weight(
            shape=(channels,),
            name="mean",
            trainable=False,
            initializer=_constant(mean, 0.0, channels),
        )
        self.std = self.add_weight(
            shape=(channels,),
            name="std",
            trainable=False,
            initializer=_constant(std, 1.0, channels),
        )

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
        batches = [data] if isinstance(data, np.ndarray) else data
        count, total, total_sq = 0, 0.0, 0.0
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = np.asarray(images, np.float64).reshape(-1, self.mean.shape[0])
            count += len(images)
            total = total + images.sum(0)
            total_sq = total_sq + (images**2).sum(0)
        if not count:
            raise ValueError("Standardize.adapt got no images.")
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        self.mean.assign(mean.astype("float32"))
        self.std.assign(np.maximum(std, 1e-6).astype("float32"))

    def call(self, inputs):
        return (inputs - keras.ops.cast(self.mean, inputs.dtype)) / keras.ops.cast(
            self.std, inputs.dtype
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        mean, std = self._initial
        if self.built:  # adapted values travel with the config as well as the weights
            mean, std = self.mean.numpy().tolist(), self.std.numpy().tolist()
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
    return keras.initializers.Constant(values)
