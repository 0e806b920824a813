"""Fashion-MNIST from IDX files on disk (Debian's `dataset-fashion-mnist`), else TFDS."""

import os

import numpy as np
import tensorflow as tf

from keras_adr.data import idx, splits, tfds
from keras_adr.data.errors import DatasetNotFoundError

# Environment variable naming a directory that holds the Fashion-MNIST IDX
# files.
DATA_DIR_ENV = "KERAS_ADR_DATA"
# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

# IDX file stems of each Fashion-MNIST split (".gz" is optional).
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load(split, data_dir, take, dataset_info):
    """Returns `(uint8 dataset, num_examples)` of a Fashion-MNIST split.

    Args:
        split: `"train"`, `"test"` or a slice of one (see `splits`).
        data_dir: Directory of the IDX files or TFDS data (None: the default
            places).
        take: Keep only the first `take` examples (None: all).
        dataset_info: Fashion-MNIST's `DatasetInfo`.

    The IDX files are searched in `data_dir` alone if it is given, else in
    `$KERAS_ADR_DATA` and `DEBIAN_FASHION_MNIST_DIR`; without them, TFDS.

    Raises:
        DatasetNotFoundError: If neither the IDX files nor TFDS have it.
        CorruptDatasetError: If the IDX files are malformed.
    """
    base, start, stop = splits.parse_split(split, valid_names=tuple(_IDX_FILES))
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DatasetNotFoundError(
            f"data_dir {os.fspath(data_dir)!r} is not a directory: give the directory that "
            "holds the Fashion-MNIST IDX files (or a TFDS data_dir), or leave it unset to use "
            f"${DATA_DIR_ENV} or {DEBIAN_FASHION_MNIST_DIR}."
        )
    search_path = _search_path(data_dir)
    for directory in search_path:
        files = _find_idx_files(directory, base)
        if files is not None:
            images, labels = idx.read_image_label_pair(*files, dataset_info.num_classes)
            start, stop = splits.resolve_slice(split, start, stop, len(labels))
            images, labels = images[start:stop], labels[start:stop]
            if take is not None:
                images, labels = images[:take], labels[:take]
            ds = tf.data.Dataset.from_tensor_slices((images[..., None], labels.astype(np.int32)))
            return ds, len(labels)
    try:
        return tfds.load("fashion_mnist", split, data_dir, take, dataset_info.num_train)
    except DatasetNotFoundError as e:
        message = _not_found_message(search_path, data_dir, e.__cause__)
        raise DatasetNotFoundError(message) from e


def _search_path(data_dir):
    """Directories searched for the Fashion-MNIST IDX files, in order.

    A directory the caller names is the only one searched: falling back to
    another copy would train on data the caller did not choose.
    """
    if data_dir:
        return [os.fspath(data_dir)]
    candidates = (
        data_dir,
        os.environ.get(DATA_DIR_ENV),
        DEBIAN_FASHION_MNIST_DIR,
    )
    return [os.fspath(d) for d in candidates if d]


def _find_idx_files(directory, split):
    """Returns the `(images, labels)` paths of `split`, or `None`."""
    paths = []
    for stem in _IDX_FILES[split]:
        for file_name in (stem + ".gz", stem):
            path = os.path.join(directory, file_name)
            if os.path.isfile(path):
                paths.append(path)
                break
        else:
            return None
    return tuple(paths)


def _not_found_message(search_path, data_dir, tfds_error):
    files = ", ".join(f"{stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair)
    places = [f"  - {directory}: no IDX files" for directory in search_path]
    if data_dir:
        places.append(
            f"  (data_dir was given, so ${DATA_DIR_ENV} and "
            f"{DEBIAN_FASHION_MNIST_DIR} were not searched)"
        )
    elif not os.environ.get(DATA_DIR_ENV):
        places.insert(len(places) - 1, f"  - ${DATA_DIR_ENV}: not set")
    places.append(f"  - TFDS data_dir {tfds.location(data_dir)}: {tfds.reason(tfds_error)}")
    places = "\n".join(places)
    return (
        f"Dataset 'fashion_mnist' not found. Looked for the IDX files "
        f"({files}) in:\n{places}\n"
        "To fix it, do one of:\n"
        f"  - {_INSTALL_HINT}\n"
        f"  - put the four IDX files in --data_dir or ${DATA_DIR_ENV}\n"
        "  - pass as --data_dir a TFDS data_dir prepared on a machine with "
        "network access (`tfds build fashion_mnist --data_dir=DIR`)."
    )
