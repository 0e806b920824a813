"""Models and data of an evaluation: a callable images -> logits, and numpy arrays.

`load_model` reads a `.keras` file (called with `training=False`), a
SavedModel (its `serving_default` signature, output `logits`) or a TF Serving
base directory (its highest version); `as_model_fn` turns whatever the caller
passes into a callable in inference mode; `materialise` turns a dataset or a
pair of arrays into checked float32 images and int32 labels.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from keras_adr import attacks as attacks_lib
from keras_adr import export, layers

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


class LoadedModel:
    """A callable images -> logits over a Keras model or a SavedModel.

    Attributes:
        kind: `"keras"` or `"saved_model"`.
        path: Where it was loaded from (None for an in-memory model).
        num_classes: Number of logits, when known.
        keras_model: The loaded Keras model (`kind == "keras"`), else None.
    """

    def __init__(self, fn, kind, path=None, keep_alive=None, num_classes=None):
        self._fn = fn
        self.kind = kind
        self.path = path
        self.num_classes = num_classes
        # A SavedModel's signature needs its loaded object (and variables)
        # alive for as long as it is called.
        self._keep_alive = keep_alive

    @property
    def keras_model(self):
        return self._keep_alive if self.kind == "keras" else None

    def __call__(self, images):
        return self._fn(images)

    def __repr__(self):
        return f"LoadedModel(kind={self.kind!r}, path={self.path!r})"


def resolve_model_path(path):
    """Resolves a model path: a `.keras` file, a SavedModel or a TF Serving base dir.

    A TF Serving base directory (integer-named version subdirectories)
    resolves to its highest version.

    Returns:
        `(kind, path)` with kind `"keras"` or `"saved_model"`.

    Raises:
        FileNotFoundError: If nothing loadable is at `path`.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return "keras", path
        raise FileNotFoundError(
            f"{path} is a file but not a '.keras' model; pass a .keras file, a SavedModel "
            "directory or a TF Serving base directory."
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No model at {path}.")
    if any(os.path.isfile(os.path.join(path, f)) for f in _SAVED_MODEL_FILES):
        return "saved_model", path
    versions = export.list_versions(path)
    if versions:
        return resolve_model_path(os.path.join(path, str(versions[-1])))
    raise FileNotFoundError(
        f"{path} is neither a SavedModel (no saved_model.pb) nor a TF Serving base directory "
        "(no integer-named version subdirectory)."
    )


def load_model(path, precision="float32"):
    """Loads a model for evaluation as a callable images -> logits.

    Args:
        path: A `.keras` file (called with `training=False`), a SavedModel
            directory (its `serving_default` signature, output `logits`), or
            a TF Serving base directory (its highest version).
        precision: The Keras dtype policy in which a `.keras` model's layers
            compute, whatever it was trained in (`keras_adr.precision.POLICIES`;
            default float32). A SavedModel computes in the precision it was
            exported with (float32 for `adr-train`'s), so it takes only float32.

    Returns:
        A `LoadedModel`.

    Raises:
        FileNotFoundError: If nothing loadable is at `path`.
        ValueError: If a SavedModel has no `serving_default` signature with a
            `logits` output, or `precision` is not float32 for a SavedModel.
    """
    from keras_adr import precision as precision_lib

    if precision not in precision_lib.POLICIES:
        raise ValueError(
            f"`precision` must be one of {', '.join(precision_lib.POLICIES)}; got {precision!r}."
        )
    kind, resolved = resolve_model_path(path)
    if kind == "keras":
        from keras_adr import adr_model, layers  # noqa: F401 - registers the custom objects.

        model = precision_lib.with_policy(
            keras.models.load_model(resolved, compile=False), precision
        )
        num_classes = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
        return LoadedModel(
            lambda images: model(images, training=False),
            "keras",
            resolved,
            keep_alive=model,
            num_classes=num_classes,
        )
    if precision != "float32":
        raise ValueError(
            f"precision={precision} (--precision) applies to .keras models; the SavedModel "
            f"{resolved} computes in the precision it was exported with. Drop --precision."
        )
    loaded = tf.saved_model.load(resolved)
    signatures = getattr(loaded, "signatures", {})
    if export.SERVING_DEFAULT not in signatures:
        raise ValueError(
            f"The SavedModel at {resolved} has no {export.SERVING_DEFAULT!r} signature; it "
            f"has {sorted(signatures)}."
        )
    signature = signatures[export.SERVING_DEFAULT]
    outputs = signature.structured_outputs
    if not isinstance(outputs, dict) or export.OUTPUT_LOGITS not in outputs:
        raise ValueError(
            f"The {export.SERVING_DEFAULT!r} signature of {resolved} has no "
            f"{export.OUTPUT_LOGITS!r} output; outputs: {outputs}."
        )
    _, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        raise ValueError(
            f"The {export.SERVING_DEFAULT!r} signature of {resolved} must take one input "
            f"(images); it takes {sorted(kwargs)}."
        )
    (input_name,) = kwargs
    num_classes = outputs[export.OUTPUT_LOGITS].shape[-1]

    def logits(images):
        return signature(**{input_name: tf.cast(images, tf.float32)})[export.OUTPUT_LOGITS]

    return LoadedModel(logits, "saved_model", resolved, keep_alive=loaded, num_classes=num_classes)


def as_model_fn(model, precision="float32"):
    """A callable images -> logits in inference mode for `model`.

    Args:
        model: A Keras model (called with `training=False`), a `LoadedModel`,
            a model path (loaded with `load_model(model, precision)`), or a
            callable images -> logits (the caller keeps it in inference mode).
        precision: The precision of a model loaded from a path.
    """
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, precision=precision)
    if isinstance(model, keras.layers.Layer):
        return attacks_lib.inference_fn(model)
    if not callable(model):
        raise ValueError(
            "`model` must be a Keras model, a LoadedModel, a path, or a callable images -> "
            f"logits; got {type(model).__name__}."
        )
    return model


def _check_not_one_hot(label_shape, unbatched):
    """Raises for labels of shape `[B, K]` (`[K]` unbatched) with K > 1: one-hot rows."""
    shape = tuple(label_shape)
    rank = len(shape) - (0 if unbatched else 1)
    if rank == 1 and shape[-1] is not None and shape[-1] > 1:
        raise ValueError(
            f"labels must be class indices; got one-hot rows of shape {shape} (use argmax, "
            "e.g. labels.argmax(-1))."
        )


def materialise(data, num_examples, clip_min, clip_max):
    """Returns the (first `num_examples`) examples as float32 / int32 numpy arrays."""
    if isinstance(data, tf.data.Dataset):
        images_spec = data.element_spec[0] if isinstance(data.element_spec, tuple) else None
        if images_spec is None or len(data.element_spec) != 2:
            raise ValueError("A dataset must yield (images, labels) pairs.")
        _check_not_one_hot(data.element_spec[1].shape, images_spec.shape.rank == 3)
        if images_spec.shape.rank == 3:  # Unbatched examples.
            data = data.batch(256)
        xs, ys, count = [], [], 0
        for x, y in data:
            xs.append(np.asarray(x))
            ys.append(np.asarray(y).reshape(-1))
            count += len(ys[-1])
            if num_examples is not None and count >= num_examples:
                break
        if not xs:
            raise ValueError("The dataset is empty.")
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        _check_not_one_hot(np.shape(data[1]), unbatched=False)
        x, y = np.asarray(data[0]), np.asarray(data[1]).reshape(-1)
    else:
        raise ValueError(
            "`data` must be a tf.data.Dataset of (images, labels) or a tuple "
            f"(images, labels) of arrays; got {type(data).__name__}."
        )
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    if len(x) and len(y) > len(x) and len(y) % len(x) == 0:
        raise ValueError(
            f"{len(x)} images but {len(y)} labels: labels must be class indices, one per "
            "image; got what looks like flattened one-hot rows (use argmax)."
        )
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels.")
    if len(x) == 0:
        raise ValueError("No examples to evaluate.")
    layers.check_pixels(x, clip_min, clip_max, name="images")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Labels must be integers; got {y.dtype}.")
    return x.astype(np.float32), y.astype(np.int32)
