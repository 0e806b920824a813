"""What ADR is handed, checked: a batch's labels, and a backbone's `Latent` layer and logits."""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_adr.layers import Latent
from keras_adr.models import LATENT_LAYER


def unpack(data):
    """`(images, labels)` of a batch; anything else (e.g. sample weights) is an error."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise ValueError(
        "ADR training expects batches of (images, integer_labels); got "
        f"{type(data).__name__} of length {len(data) if isinstance(data, (tuple, list)) else 1}. "
        "Sample weights are not supported."
    )


def num_images(x):
    """The batch size of `x`: an int if static, else a scalar tensor."""
    return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def checked_labels(y, num_classes=None, num_images=None):
    """`[B]` int32 labels, with run-time checks that they are class indices.

    Fails (also inside `tf.function`) on fractional float labels, negative
    labels and, when `num_classes` is known, labels >= `num_classes`: such
    labels would otherwise surface as an error deep inside a loss term (or
    be truncated silently by a cast), and on one-hot rows: statically for
    `[B, K]` labels, at run time for more labels than `num_images`.
    """
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] is not None and y.shape[-1] > 1:
        # Flattened, one-hot rows would fail later as "labels.shape=(640,)".
        raise ValueError(
            f"ADR training: labels must be class indices; got one-hot rows of shape "
            f"{tuple(y.shape)} (use argmax, e.g. y.argmax(-1))."
        )
    y = tf.reshape(y, [-1])
    what = "ADR training needs integer class labels in [0, num_classes)"
    checks = []
    if y.dtype.is_floating:
        checks.append(
            tf.debugging.assert_equal(y, tf.round(y), message=f"{what}; got fractional labels")
        )
    elif not y.dtype.is_integer:
        raise ValueError(f"{what}; got labels of dtype {y.dtype.name}.")
    labels = tf.cast(y, tf.int32)
    checks.append(tf.debugging.assert_non_negative(labels, message=f"{what}; got a negative label"))
    one_per_image = (
        "ADR training: labels must be class indices, one per image (flattened one-hot rows: "
        "use argmax; an unbatched tf.data.Dataset: call .batch())"
    )
    if isinstance(num_images, int) and labels.shape[0] is not None:
        if labels.shape[0] != num_images:
            raise ValueError(
                f"{one_per_image}; got {labels.shape[0]} labels for {num_images} images."
            )
    elif num_images is not None:
        checks.append(
            tf.debugging.assert_equal(
                tf.size(labels), tf.cast(num_images, tf.int32), message=one_per_image
            )
        )
    if num_classes:
        checks.append(
            tf.debugging.assert_less(
                labels,
                tf.constant(num_classes, tf.int32),
                message=f"{what} with num_classes={num_classes}; got a label >= {num_classes}",
            )
        )
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def find_latent_layer(backbone, name):
    """The layer of `backbone` whose output is `z`: by `name`, else the one `Latent` layer."""
    if name is None:
        marked = [layer for layer in backbone.layers if isinstance(layer, Latent)]
        if len(marked) == 1:
            return marked[0]
        if len(marked) > 1:
            raise ValueError(
                f"The backbone has {len(marked)} Latent layers "
                f"({[layer.name for layer in marked]}); keep one, or pass "
                "latent_layer=<the name of the one to use>."
            )
        name = LATENT_LAYER  # Models built before the Latent layer existed.
    try:
        return backbone.get_layer(name)
    except ValueError:
        names = [layer.name for layer in backbone.layers]
        raise ValueError(
            f"The backbone has no keras_adr.layers.Latent layer and no layer named {name!r} to "
            f"use as the latent code; its layers are: {names}. Add a Latent layer after the "
            "features, or pass latent_layer=<one of them>."
        ) from None


# A probe row counts as probabilities within this tolerance: bfloat16 rounds
# a softmax's sum by up to about 2**-8 per term.
_PROBABILITY_TOLERANCE = 2e-2


def check_logits(backbone, allow_probabilities):
    """Raises (or warns) if `backbone` outputs probabilities rather than logits.

    The outputs are checked, not the last layer's `activation`, so that a
    `Softmax` layer, a softmax `Dense`/`Activation` or a normalising `Lambda`
    are all found: on a probe batch of two images in [0, 1] (zeros and
    uniform noise), rows all in [0, 1] that sum to 1 are probabilities. Where
    the probe cannot run eagerly (inside a `tf.function`) or the input shape
    has unknown dimensions, only a softmax activation of the last layer is
    checked.
    """
    last = backbone.layers[-1].name
    shape = tuple(backbone.inputs[0].shape[1:])
    if tf.executing_eagerly() and all(d is not None for d in shape):
        rng = np.random.default_rng(0)
        probe = np.stack([np.zeros(shape), rng.uniform(0.0, 1.0, shape)]).astype(np.float32)
        outputs = tf.cast(backbone(probe, training=False), tf.float32).numpy()
        probabilities = (
            outputs.ndim == 2
            and outputs.shape[-1] > 1
            and outputs.min() >= -_PROBABILITY_TOLERANCE
            and outputs.max() <= 1 + _PROBABILITY_TOLERANCE
            and np.allclose(outputs.sum(-1), 1.0, atol=_PROBABILITY_TOLERANCE)
        )
    else:
        layer = backbone.layers[-1]
        probabilities = isinstance(layer, keras.layers.Softmax) or (
            getattr(layer, "activation", None) is keras.activations.softmax
        )
    if not probabilities:
        return
    message = (
        f"The backbone outputs probabilities (rows in [0, 1] that sum to 1; last layer "
        f"{last!r}), but ADR and the attacks need logits: remove the softmax from {last!r} "
        "(use from_logits=True losses elsewhere), or pass allow_probabilities=True if the "
        "outputs are logits that only look like probabilities."
    )
    if not allow_probabilities:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)
