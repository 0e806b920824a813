"""Atomic SavedModel export in the TensorFlow Serving directory layout.

TF Serving watches a *base path* and serves each child directory whose name
parses as an integer as one version of the model:

```
base_dir/
  1/                      <- version 1: a complete SavedModel
    saved_model.pb
    variables/...
    assets.extra/keras_adr_metadata.json
    assets.extra/tf_serving_warmup_requests
  2/
  .tmp-export-3-4242-9f2c...   <- export in progress, ignored by TF Serving
```

`export_saved_model()` writes each version into a hidden temporary directory
beside its final place, flushes it to disk, and renames it into place only
when it is complete. A rename within one file system is atomic, so a reader
(or a crash at any moment) sees either no new version or a complete one.

Every export has two signatures:

- `serving_default`: `images` float32 `[batch, H, W, C]` with values in
  `[0, 1]`.
- `serve_uint8`: `images` uint8 `[batch, H, W, C]`, raw pixels (divided by
  255 inside the graph).

Both return `probabilities` (float32 softmax), `classes` (int64 argmax) and
`logits` (float32). Inputs of the wrong rank, shape or dtype, float inputs
that are not finite and float inputs outside `[0, 1]` make the request fail
with an error instead of returning a confident class: the model was trained
(and its robustness measured) on pixels in `[0, 1]` only, so silently
clipping would hide client bugs such as forgetting to divide by 255.

With `tensorflow-serving-api` installed, each version also holds TF
Serving's warm-up file (`assets.extra/tf_serving_warmup_requests`): a few
requests for each signature, which the server runs when it loads the
version, so that the first client request is not slow.

Example:

```python
path = export_saved_model(model, "saved_models/fashion_mnist",
                          metadata={"preset": "adr_trades"})
write_models_config("saved_models/models.config", "fashion_mnist",
                    "/models/fashion_mnist")
```
"""

import datetime
import errno
import json
import numbers
import os
import re
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_adr import fileio, layers

SERVING_DEFAULT = "serving_default"
SERVE_UINT8 = "serve_uint8"
SIGNATURE_NAMES = (SERVING_DEFAULT, SERVE_UINT8)

INPUT_NAME = "images"
OUTPUT_PROBABILITIES = "probabilities"
# Images per model call inside the serving signatures: bounds a request's
# activation memory (the small CNN needs about 256 KiB per image).
SERVING_CHUNK = 1024
OUTPUT_CLASSES = "classes"
OUTPUT_LOGITS = "logits"
OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_CLASSES, OUTPUT_LOGITS)

# Input dtype of each signature; clients use it to encode their requests.
SIGNATURE_INPUT_DTYPES = {SERVING_DEFAULT: "float32", SERVE_UINT8: "uint8"}

METADATA_DIRNAME = "assets.extra"
EXPORT_METADATA_FILENAME = "keras_adr_metadata.json"
# TF Serving runs the requests in this file (a TFRecord of PredictionLogs) when
# it loads a version, before serving it: the first client request is not slow.
WARMUP_FILENAME = "tf_serving_warmup_requests"
# Batch sizes of the warm-up requests, one request each per signature.
WARMUP_BATCH_SIZES = (1, 4, 16)
METADATA_FORMAT_VERSION = 1

TEMP_EXPORT_PREFIX = ".tmp-export-"
TEMP_REPLACED_PREFIX = ".tmp-replaced-"

# TF Serving stores versions as int64.
_MAX_VERSION = 2**63 - 1
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
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


def export_saved_model(model, base_dir, *, version=None, metadata=None, overwrite=False):
    """Exports a classifier as one version of a TF Serving model.

    The SavedModel is written into a hidden temporary directory inside
    `base_dir` (named `.tmp-export-<version>-<pid>-<random>`, which TF Serving
    ignores because it does not parse as an integer), flushed to disk with
    `fsync`, and renamed to `base_dir/<version>` only once complete. If the
    process dies at any point, no partial version directory is ever visible.

    Temporaries left behind by processes that died are removed at the start
    of the next export into the same `base_dir` (see
    `cleanup_stale_temporaries()`), which also restores a version that was
    being replaced when its exporter died.

    Args:
        model: A built Keras 3 model with one rank-4 image input of fully
            defined shape `(None, H, W, C)`. `model(x, training=False)` must
            return logits of shape `(batch, num_classes)` for float32 images
            with values in `[0, 1]`.
        base_dir: The model's base path as given to TF Serving. Created if
            missing.
        version: Positive integer version. Defaults to one more than the
            largest existing version (1 for an empty `base_dir`).
        metadata: Optional JSON-serialisable dict recorded in
            `<version>/assets.extra/keras_adr_metadata.json` next to what the
            export knows (shapes, signatures, library versions, time). Its
            keys must not collide with those reserved by the export.
        overwrite: Whether to replace an existing version. The old version is
            moved aside, the new one renamed in, and only then is the old one
            deleted.

    Returns:
        The path of the new version directory, `base_dir/<version>`.

    Raises:
        ValueError: If `version` is not a positive integer, the model's input
            is not a fully defined rank-4 shape, the model does not return a
            single rank-2 logits tensor, or `metadata` is not a
            JSON-serialisable dict with unreserved keys.
        FileExistsError: If the version exists and `overwrite` is False.
    """
    if version is not None:
        version = _validate_version(version)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"`metadata` must be a dict. Received: {type(metadata).__name__}")
    _check_user_metadata(metadata)  # before anything is written
    image_shape = _image_shape(model)
    base_dir = os.fspath(base_dir)
    os.makedirs(base_dir, exist_ok=True)
    cleanup_stale_temporaries(base_dir)

    if version is not None and not overwrite:
        _check_version_free(base_dir, version)
    planned_version = version or _next_version(base_dir)

    temp_dir, lock_fd = fileio.make_locked_temp_dir(
        base_dir, f"{TEMP_EXPORT_PREFIX}{planned_version}-"
    )
    try:
        signatures, num_classes = _write_saved_model(model, image_shape, temp_dir)
        warmup_requests = _write_warmup_requests(temp_dir, image_shape)
        export_metadata = _export_metadata(
            model,
            image_shape,
            num_classes,
            signatures,
            warmup_requests,
            metadata,
        )
        _write_metadata(temp_dir, export_metadata)
        fileio.fsync_tree(temp_dir)
        return _publish(temp_dir, base_dir, version, overwrite=overwrite)
    except BaseException:
        # Also on KeyboardInterrupt: a half-written temporary is useless.
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        fileio.unlock(lock_fd)


def cleanup_stale_temporaries(base_dir):
    """Removes temporaries left in `base_dir` by exports that died.

    Each temporary directory is `flock`ed by its exporting process for its
    whole life, and the kernel drops the lock when that process exits, even
    on `SIGKILL`. A temporary whose lock can be taken therefore belongs to
    no live export. Stale `.tmp-export-*` directories are deleted. A stale
    `.tmp-replaced-<version>-*` directory (a version moved aside by an
    `overwrite=True` export) is renamed back to `<version>` if that version is
    missing, since its replacement never arrived, and deleted otherwise.

    Exports in progress in other processes are left alone. `export_saved_model`
    calls this at its start. On platforms without `fcntl` nothing is
    considered stale.

    Args:
        base_dir: The model's base path.

    Returns:
        List of the paths that were removed or restored.
    """
    base_dir = os.fspath(base_dir)
    if not fileio.LOCKS_SUPPORTED or not os.path.isdir(base_dir):
        return []
    handled = []
    for name in sorted(os.listdir(base_dir)):
        if not name.startswith((TEMP_EXPORT_PREFIX, TEMP_REPLACED_PREFIX)):
            continue
        path = os.path.join(base_dir, name)
        lock_fd = fileio.try_lock_dir(path)
        if lock_fd is None:
            continue  # Still in use, or already gone.
        try:
            restored = _restore_replaced(base_dir, name)
            if not restored:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
        finally:
            fileio.unlock(lock_fd)
    if handled:
        fileio.fsync_dir(base_dir)
    return handled


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


def list_versions(base_dir):
    """Returns the sorted integer versions present in `base_dir`.

    Args:
        base_dir: The model's base path.

    Returns:
        Sorted list of ints; empty if `base_dir` does not exist.
    """
    return sorted(_existing_versions(os.fspath(base_dir)))


def models_config(model_name, base_path, *, model_platform="tensorflow"):
    """Returns the text of a TF Serving `models.config` for one model.

    The text is TF Serving's own `ModelServerConfig` proto in text format,
    written with `tensorflow_serving.config.model_server_config_pb2` when
    `tensorflow-serving-api` is installed (the same text without it).

    Args:
        model_name: Name clients use in URLs and requests. Letters, digits,
            `_`, `.` and `-`, starting with a letter or digit.
        base_path: The model's base path as seen by the server (an absolute
            path inside the server's container when using Docker).
        model_platform: TF Serving platform name.

    Returns:
        The `model_config_list` text proto, ending with a newline.

    Raises:
        ValueError: If `model_name` or `base_path` is invalid.
    """
    if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
        raise ValueError(
            "`model_name` must contain only letters, digits, '_', '.' and "
            f"'-', starting with a letter or digit. Received: {model_name!r}"
        )
    base_path = os.fspath(base_path)
    if not base_path or "\n" in base_path or "\0" in base_path:
        raise ValueError(f"Invalid `base_path`: {base_path!r}")
    pb2 = _model_server_config_pb2()
    if pb2 is not None:
        from google.protobuf import text_format

        config = pb2.ModelServerConfig()
        entry = config.model_config_list.config.add()
        entry.name = model_name
        entry.base_path = base_path
        entry.model_platform = model_platform
        return text_format.MessageToString(config, as_utf8=True)
    return (
        "model_config_list {\n"
        "  config {\n"
        f"    name: {_proto_string(model_name)}\n"
        f"    base_path: {_proto_string(base_path)}\n"
        f"    model_platform: {_proto_string(model_platform)}\n"
        "  }\n"
        "}\n"
    )


def _model_server_config_pb2():
    """TF Serving's config protos, or None without `tensorflow-serving-api`."""
    try:
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        return None
    return model_server_config_pb2


def write_models_config(path, model_name, base_path, **kwargs):
    """Writes `models_config(model_name, base_path)` to `path` atomically.

    TF Serving may poll the file (`--model_config_file_poll_wait_seconds`),
    so it is replaced with a rename rather than rewritten in place.

    Args:
        path: Where to write the config file.
        model_name: See `models_config()`.
        base_path: See `models_config()`.
        **kwargs: Passed to `models_config()`.

    Returns:
        `path` as a string.
    """
    return fileio.write_text(path, models_config(model_name, base_path, **kwargs))


# Model and signatures.


def _image_shape(model):
    """Returns `(H, W, C)` of the model's single image input."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError) as err:
        raise ValueError(
            "Cannot read the model's input shape; build it on a "
            f"`keras.Input` of shape (H, W, C) before export. Error: {err}"
        ) from err
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or any(not isinstance(d, int) or d <= 0 for d in shape[1:])
    ):
        raise ValueError(
            "The model must have one rank-4 image input with fully defined "
            f"(H, W, C), e.g. (None, 28, 28, 1). Received: {shape}"
        )
    return tuple(shape[1:])


def _checked_float_images(images, image_shape):
    """Adds in-graph checks that float images have `image_shape`, are finite and in [0, 1]."""
    # The signature's TensorSpec is checked by Python callers only; TF
    # Serving feeds tensors straight into the graph, so check again here.
    images = tf.ensure_shape(images, (None, *image_shape))
    return layers.check_pixels(
        images, 0.0, 1.0, hint="Divide uint8 pixels by 255 or use the 'serve_uint8' signature."
    )


def _uint8_to_float_images(images, image_shape):
    """Checks the shape of uint8 images and scales them to [0, 1]."""
    images = tf.ensure_shape(images, (None, *image_shape))
    return tf.cast(images, tf.float32) / 255.0


def _predict(model, images):
    """Returns the output dict of both signatures for images in [0, 1].

    The model runs on chunks of `SERVING_CHUNK` images, one after the other,
    so that a large request needs the memory of one chunk's activations (an
    empty request returns empty outputs).
    """
    spec = model.compute_output_spec(
        keras.KerasTensor((SERVING_CHUNK, *images.shape[1:]), dtype="float32")
    )
    if not hasattr(spec, "shape") or len(spec.shape) != 2 or spec.shape[-1] is None:
        raise ValueError(
            "`model(images, training=False)` must return one logits tensor "
            f"of shape (batch, num_classes). Received: {spec!r}"
        )
    num_classes = spec.shape[-1]
    num_chunks = (tf.shape(images)[0] + SERVING_CHUNK - 1) // SERVING_CHUNK
    chunks = tf.TensorArray(
        tf.float32,
        size=num_chunks,
        infer_shape=False,
        element_shape=tf.TensorShape([None, num_classes]),
    )

    def body(i, chunks):
        chunk = images[i * SERVING_CHUNK : (i + 1) * SERVING_CHUNK]
        # Mixed-precision models return float16/bfloat16 logits; serve float32.
        return i + 1, chunks.write(i, tf.cast(model(chunk, training=False), tf.float32))

    _, chunks = tf.while_loop(lambda i, _: i < num_chunks, body, (0, chunks), parallel_iterations=1)
    logits = tf.cond(num_chunks > 0, chunks.concat, lambda: tf.zeros([0, num_classes], tf.float32))
    logits = tf.debugging.assert_all_finite(logits, "the model produced non-finite logits")
    return {
        OUTPUT_PROBABILITIES: tf.nn.softmax(logits, axis=-1),
        OUTPUT_CLASSES: tf.argmax(logits, axis=-1, output_type=tf.int64),
        OUTPUT_LOGITS: logits,
    }


def _write_saved_model(model, image_shape, directory):
    """Writes the SavedModel with both signatures into `directory`.

    Returns:
        Tuple `(signatures, num_classes)` where `signatures` describes each
        signature's inputs and outputs for the metadata.
    """
    batch_shape = (None, *image_shape)

    def serve_float(images):
        return _predict(model, _checked_float_images(images, image_shape))

    def serve_uint8(images):
        return _predict(model, _uint8_to_float_images(images, image_shape))

    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoints = {
        SERVING_DEFAULT: (serve_float, tf.float32),
        SERVE_UINT8: (serve_uint8, tf.uint8),
    }
    signatures = {}
    num_classes = None
    for name, (fn, dtype) in endpoints.items():
        spec = tf.TensorSpec(batch_shape, dtype, name=INPUT_NAME)
        endpoint = archive.add_endpoint(name, fn, input_signature=[spec])
        outputs = endpoint.get_concrete_function().structured_outputs
        num_classes = outputs[OUTPUT_LOGITS].shape[-1]
        signatures[name] = {
            "inputs": {INPUT_NAME: _describe_spec(spec)},
            "outputs": {key: _describe_spec(tensor) for key, tensor in outputs.items()},
        }
    archive.write_out(directory, verbose=False)
    return signatures, num_classes


def _describe_spec(tensor):
    return {"dtype": tensor.dtype.name, "shape": tensor.shape.as_list()}


# Metadata.


def _check_user_metadata(user):
    """Raises ValueError for reserved keys or values that are not strict JSON (NaN, ...)."""
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


def _export_metadata(model, image_shape, num_classes, signatures, warmup_requests, user):
    """Merges what the export knows with the caller's metadata."""
    user = dict(user or {})
    _check_user_metadata(user)
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


def _write_metadata(version_dir, metadata):
    directory = os.path.join(version_dir, METADATA_DIRNAME)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EXPORT_METADATA_FILENAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def _write_warmup_requests(version_dir, image_shape):
    """Writes TF Serving's warm-up file into `version_dir`'s `assets.extra`.

    One `PredictRequest` per signature and batch size of
    `WARMUP_BATCH_SIZES`, of random (seeded) valid pixels.

    Returns:
        The number of requests written; 0 (and no file) without
        `tensorflow-serving-api`, whose protos the file is made of.
    """
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        return 0
    from keras_adr import serving

    directory = os.path.join(version_dir, METADATA_DIRNAME)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    count = 0
    with tf.io.TFRecordWriter(os.path.join(directory, WARMUP_FILENAME)) as writer:
        for name in SIGNATURE_NAMES:
            for batch_size in WARMUP_BATCH_SIZES:
                pixels = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
                # The model name is the server's (models.config); TF Serving
                # reads only the signature name of a warm-up request.
                request = serving.grpc_predict_request(pixels, model_name="", signature_name=name)
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                count += 1
    return count


def _keras_adr_version():
    import importlib.metadata
    import sys

    try:
        return importlib.metadata.version("keras-adr")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source checkout that is not pip-installed.
        package = sys.modules.get("keras_adr")
        return getattr(package, "__version__", "unknown")


# Versions and the file system.


def _validate_version(version):
    # bool is an int subclass, but `version=True` is surely a mistake.
    if (
        isinstance(version, bool)
        or not isinstance(version, numbers.Integral)
        or not 0 < version <= _MAX_VERSION
    ):
        raise ValueError(
            "`version` must be a positive integer (TF Serving versions are "
            f"int64). Received: {version!r}"
        )
    return int(version)


def _existing_versions(base_dir):
    """Maps each version in `base_dir` to its directory name."""
    if not os.path.isdir(base_dir):
        return {}
    versions = {}
    for name in os.listdir(base_dir):
        # TF Serving parses names as int64, so "007" would be version 7.
        if name.isascii() and name.isdigit():
            if os.path.isdir(os.path.join(base_dir, name)):
                versions[int(name)] = name
    return versions


def _next_version(base_dir):
    return max(_existing_versions(base_dir), default=0) + 1


def _check_version_free(base_dir, version):
    existing = _existing_versions(base_dir)
    if version in existing:
        raise FileExistsError(
            errno.EEXIST,
            f"Version {version} already exists; pass overwrite=True to replace it",
            os.path.join(base_dir, existing[version]),
        )


def _publish(temp_dir, base_dir, version, *, overwrite):
    """Renames a complete temporary directory into its version's place.

    Args:
        temp_dir: The complete, flushed SavedModel directory.
        base_dir: The model's base path.
        version: The requested version, or None for the next free one.
        overwrite: Whether to replace an existing version.

    Returns:
        The path of the version directory.
    """
    if version is None:
        # Chosen now rather than at the start so that a concurrent export
        # that finished meanwhile is not clobbered.
        version = _next_version(base_dir)
    existing = _existing_versions(base_dir)
    target = os.path.join(base_dir, str(version))
    if version not in existing:
        os.rename(temp_dir, target)
        fileio.fsync_dir(base_dir)
        return target
    if not overwrite:
        _check_version_free(base_dir, version)
    old = os.path.join(base_dir, existing[version])
    # Locked before the move so that a concurrent cleanup cannot mistake it
    # for a stale leftover while it is in its temporary place.
    old_lock = fileio.try_lock_dir(old)
    try:
        aside = fileio.unique_temp_path(base_dir, f"{TEMP_REPLACED_PREFIX}{version}-")
        os.rename(old, aside)
        # A crash between these renames leaves no version; the next cleanup
        # renames `aside` back.
        try:
            os.rename(temp_dir, target)
        except OSError:
            os.rename(aside, old)
            raise
        fileio.fsync_dir(base_dir)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        fileio.unlock(old_lock)
    return target


def _restore_replaced(base_dir, name):
    """Renames a stale moved-aside version back if nothing replaced it."""
    if not name.startswith(TEMP_REPLACED_PREFIX):
        return False
    version_text = name[len(TEMP_REPLACED_PREFIX) :].split("-", 1)[0]
    if not version_text.isdigit():
        return False
    if int(version_text) in _existing_versions(base_dir):
        return False
    os.rename(os.path.join(base_dir, name), os.path.join(base_dir, version_text))
    return True


def _proto_string(value):
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
