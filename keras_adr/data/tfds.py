"""Datasets prepared with TensorFlow Datasets (TFDS); never downloaded here."""

import os

import tensorflow as tf

from keras_adr.data.errors import DatasetNotFoundError


def load(name, split, data_dir, take, size_if_unknown):
    """Returns `(uint8 dataset, num_examples)` of a prepared TFDS split.

    Args:
        name: TFDS dataset name.
        split: TFDS split, e.g. `"train[:1000]"`.
        data_dir: TFDS data directory (None: TFDS's default).
        take: Keep only the first `take` examples (None: all).
        size_if_unknown: `num_examples` when TFDS cannot tell the size.

    Raises:
        DatasetNotFoundError: If the dataset is not prepared in `data_dir`
            (nothing is ever downloaded).
    """
    import tensorflow_datasets as tfds  # Slow import: only when needed.

    try:
        ds = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            download=False,
            shuffle_files=False,
        )
    except (
        AssertionError,  # TFDS's "could not find data in ..." error.
        OSError,
        tf.errors.NotFoundError,
        tfds.core.registered.DatasetNotFoundError,
    ) as e:
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} not found in data_dir "
            f"{location(data_dir)} ({reason(e)}). keras_adr "
            "never downloads, and TFDS needs network access to prepare a "
            "dataset: on a machine with network access run "
            f"`tfds build {name} --data_dir=DIR`, then pass DIR as data_dir."
        ) from e
    if take is not None:
        ds = ds.take(take)
    num_examples = int(ds.cardinality())
    if num_examples < 0:  # Unknown or infinite.
        num_examples = size_if_unknown
    return ds, num_examples


def location(data_dir):
    """Where TFDS looks for prepared datasets, for messages."""
    if data_dir:
        return os.fspath(data_dir)
    return "(TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"


def reason(error):
    """A short description of why TFDS could not load a dataset."""
    if isinstance(error, AssertionError):  # "could not find data in ...".
        return "not prepared there"
    return f"{type(error).__name__}: {error}"
