"""The metadata file of an exported version: what it records, its checks, writing and reading it.

Each version directory holds `assets.extra/keras_adr_metadata.json`: what
the export knows (input shape and dtype, number of classes, each
signature's inputs and outputs, the number of warm-up requests, library
versions, export time) merged with the caller's own JSON-serialisable
metadata, whose keys must not collide with the export's. The caller's
metadata is checked before anything is written.
"""

import datetime
import json
import os

import keras
import tensorflow as tf

METADATA_DIRNAME = "assets.extra"
EXPORT_METADATA_FILENAME = "keras_adr_metadata.json"
METADATA_FORMAT_VERSION = 1

_RESERVED_METADATA_KEYS = frozenset(
    {
        "format_version",
        "version",
        "export_time",
        "keras_adr_version",
        "keras_version",
        "tensorflow_version",
        "model_name",
        "input_shape",
        "input_dtype",
        "num_classes",
        "signatures",
        "warmup_requests",
    }
)


def read_metadata(version_dir):
    """Reads the metadata written by `export_saved_model()`.

    Args:
        version_dir: A version directory, e.g. the path returned by
            `export_saved_model()`.

    Returns:
        The metadata dict.

    Raises:
        FileNotFoundError: If the directory has no keras-adr metadata.
    """
    path = os.path.join(os.fspath(version_dir), METADATA_DIRNAME, EXPORT_METADATA_FILENAME)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_user_metadata(user):
    """Raises ValueError for reserved keys or values that are not strict JSON (NaN, ...).

    Args:
        user: The caller's metadata dict, or None.

    Raises:
        ValueError: If a key is reserved by the export or a value is not
            strict JSON.
    """
    user = dict(user or {})
    reserved = sorted(_RESERVED_METADATA_KEYS.intersection(user))
    if reserved:
        raise ValueError(
            f"`metadata` keys {reserved} are reserved by the export. "
            f"Reserved keys: {sorted(_RESERVED_METADATA_KEYS)}"
        )
    try:
        json.dumps(user, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"`metadata` must be JSON-serialisable. Error: {err}") from None


def export_metadata(model, image_shape, num_classes, signatures, warmup_requests, user):
    """Merges what the export knows with the caller's metadata.

    Args:
        model: The exported Keras model.
        image_shape: `(H, W, C)` of its input.
        num_classes: The number of logits.
        signatures: Each signature's inputs and outputs, as returned by
            `signature_graphs.write_saved_model()`.
        warmup_requests: The number of warm-up requests written.
        user: The caller's metadata dict, or None.

    Returns:
        The metadata dict to write.

    Raises:
        ValueError: As `check_user_metadata()`.
    """
    user = dict(user or {})
    check_user_metadata(user)
    known = {
        "format_version": METADATA_FORMAT_VERSION,
        "export_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "keras_adr_version": _keras_adr_version(),
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "model_name": model.name,
        "input_shape": [None, *image_shape],
        "input_dtype": "float32",
        "num_classes": num_classes,
        "signatures": signatures,
        "warmup_requests": warmup_requests,
    }
    merged = {**known, **user}
    try:
        # Fail before anything is published rather than write bad JSON.
        json.dumps(merged, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`metadata` must be JSON-serialisable. Error: {err}") from err
    return merged


def write_metadata(version_dir, metadata):
    """Writes `metadata` as `version_dir/assets.extra/keras_adr_metadata.json`."""
    directory = os.path.join(version_dir, METADATA_DIRNAME)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EXPORT_METADATA_FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def _keras_adr_version():
    import importlib.metadata
    import sys

    try:
        return importlib.metadata.version("keras-adr")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source checkout that is not pip-installed.
        package = sys.modules.get("keras_adr")
        return getattr(package, "__version__", "unknown")
