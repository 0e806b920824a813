"""`export_saved_model()`: one Keras classifier becomes one complete version of a TF Serving model.

It checks the model and the caller's metadata before writing anything,
cleans up after exporters that died, then writes the SavedModel
(`signature_graphs`), the warm-up file (`warmup`) and the metadata
(`metadata`) into a locked temporary directory, flushes it to disk, and
publishes it as the next (or the given) version (`versions`). On any error,
nothing but the versions that were there before is left.
"""

import os
import shutil

from keras_adr import fileio, signatures
from keras_adr.export.metadata import check_user_metadata, export_metadata, write_metadata
from keras_adr.export.signature_graphs import model_image_shape, write_saved_model
from keras_adr.export.versions import (
    TEMP_EXPORT_PREFIX,
    check_version_free,
    cleanup_stale_temporaries,
    next_version,
    publish,
)
from keras_adr.export.warmup import write_warmup_requests


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
        version = signatures.validate_version(version)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"`metadata` must be a dict. Received: {type(metadata).__name__}")
    check_user_metadata(metadata)  # before anything is written
    image_shape = model_image_shape(model)
    base_dir = os.fspath(base_dir)
    os.makedirs(base_dir, exist_ok=True)
    cleanup_stale_temporaries(base_dir)

    if version is not None and not overwrite:
        check_version_free(base_dir, version)
    planned_version = version or next_version(base_dir)

    temp_dir, lock_fd = fileio.make_locked_temp_dir(
        base_dir, f"{TEMP_EXPORT_PREFIX}{planned_version}-"
    )
    try:
        signature_descriptions, num_classes = write_saved_model(model, image_shape, temp_dir)
        warmup_requests = write_warmup_requests(temp_dir, image_shape)
        version_metadata = export_metadata(
            model,
            image_shape,
            num_classes,
            signature_descriptions,
            warmup_requests,
            metadata,
        )
        write_metadata(temp_dir, version_metadata)
        fileio.fsync_tree(temp_dir)
        return publish(temp_dir, base_dir, version, overwrite=overwrite)
    except BaseException:
        # Also on KeyboardInterrupt: a half-written temporary is useless.
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        fileio.unlock(lock_fd)
