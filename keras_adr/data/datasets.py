"""Datasets for adversarial training: offline Fashion-MNIST and TFDS.

Every loader returns a batched, prefetched `tf.data.Dataset` of
`(images, labels)` with `float32` images of shape `[B, H, W, C]` in `[0, 1]`
and `int32` labels of shape `[B]`. Pixels are never normalised here: any
normalisation is a layer inside the model, so that an attack's epsilon always
means the same thing.

Fashion-MNIST (the default) is read from IDX files, which Debian's
`dataset-fashion-mnist` package installs, so it works without network access.
The other datasets come from TensorFlow Datasets (TFDS) and must already be
prepared in a TFDS `data_dir`: `load()` never downloads anything, so a missing
dataset fails at once instead of hanging on an offline machine.

Example:

```python
train_ds = keras_adr.data.load(
    "fashion_mnist", "train[:55000]", batch_size=128, shuffle=True, seed=0
)
val_ds = keras_adr.data.load("fashion_mnist", "train[55000:]", batch_size=512)
```
"""

import dataclasses
import gzip
import math
import os
import re

import numpy as np
import tensorflow as tf

DEFAULT_DATASET = "fashion_mnist"
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn_cropped")

# Environment variable naming a directory that holds the Fashion-MNIST IDX
# files.
DATA_DIR_ENV = "KERAS_ADR_DATA"
# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

# Padding, in pixels on each side, of the random-crop augmentation.
_CROP_PADDING = 4

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# IDX file stems of each Fashion-MNIST split (".gz" is optional).
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# `train`, `test[:1000]`, `train[55000:]`, `train[:10%]`, `test[-5%:]`.
_SPLIT_RE = re.compile(
    r"^(?P<name>[\w-]+)"
    r"(?:\[(?P<start>-?[\d.]+%?)?:(?P<stop>-?[\d.]+%?)?\])?$"
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor in a prepared TFDS `data_dir`."""


class CorruptDatasetError(ValueError):
    """A dataset file is truncated, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: The dataset name, one of `DATASETS`.
        num_classes: Number of classes; labels are in `[0, num_classes)`.
        input_shape: Shape `(H, W, C)` of one image.
        class_names: Human-readable name of each label, indexed by label.
        num_train: Number of examples in the `"train"` split.
        num_test: Number of examples in the `"test"` split.
    """

    name: str
    num_classes: int
    input_shape: tuple
    class_names: tuple
    num_train: int
    num_test: int


_DIGITS = tuple(str(i) for i in range(10))

_FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# The 100 "fine" labels of CIFAR-100, in label order (as in TFDS).
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee",
    "beetle", "bicycle", "bottle", "bowl", "boy", "bridge", "bus",
    "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
    "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter",
    "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate",
    "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

_INFOS = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), _FASHION_MNIST_CLASSES, 60000, 10000
    ),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), _DIGITS, 60000, 10000),
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), _CIFAR10_CLASSES, 50000, 10000
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), _CIFAR100_CLASSES, 50000, 10000
    ),
    "svhn_cropped": DatasetInfo(
        "svhn_cropped", 10, (32, 32, 3), _DIGITS, 73257, 26032
    ),
}

# Augmentation of each dataset's training images: (random crop, random flip).
# Digits and Fashion-MNIST are not augmented; digits must not be flipped.
_AUGMENTATIONS = {
    "fashion_mnist": (False, False),
    "mnist": (False, False),
    "cifar10": (True, True),
    "cifar100": (True, True),
    "svhn_cropped": (True, False),
}


def info(name):
    """Returns the static description of a dataset.

    Args:
        name: A dataset name, one of `DATASETS`.

    Returns:
        A `DatasetInfo`.

    Raises:
        ValueError: If `name` is not one of `DATASETS`.
    """
    _check_name(name)
    return _INFOS[name]


def load(
    name=DEFAULT_DATASET,
    split="train",
    *,
    batch_size,
    shuffle=False,
    augment=False,
    data_dir=None,
    take=None,
    seed=None,
    drop_remainder=False,
):
    """Loads a dataset split as batched `(images, labels)`.

    Fashion-MNIST is read from IDX files (`.gz` or not), searched in order in
    `data_dir`, in `$KERAS_ADR_DATA` and in `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist`); if none holds them, it falls back to
    TFDS. The other datasets come from TFDS. TFDS datasets must already be
    prepared in `data_dir` (or TFDS's default directory): nothing is ever
    downloaded.

    Augmentation (`augment=True`) is applied per batch, vectorised:
    - `cifar10`, `cifar100`: zero-pad 4 pixels on each side, random crop
      back to 32x32, random horizontal flip (as torchvision's
      `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`).
    - `svhn_cropped`: the same zero-pad-4 random crop, no flip (digits).
    - `fashion_mnist`, `mnist`: none; `augment=True` is a no-op.

    Args:
        name: Dataset name, one of `DATASETS`.
        split: `"train"`, `"test"` or a TFDS-style slice of one of them, such
            as `"train[:55000]"`, `"train[55000:]"`, `"test[:1000]"` or
            `"train[:10%]"`.
        batch_size: Number of examples per batch.
        shuffle: Whether to shuffle the examples, with a buffer that holds the
            whole split, reshuffled at each iteration.
        augment: Whether to apply the dataset's training augmentation.
        data_dir: Directory holding the Fashion-MNIST IDX files, or a TFDS
            data directory.
        take: If given, keep only the first `take` examples of the split,
            before shuffling.
        seed: Seed of the shuffling and the augmentation: the same seed
            gives the same sequence of epochs (each epoch still differs from
            the previous one). `None` draws fresh randomness.
        drop_remainder: Whether to drop the last, smaller batch.

    Returns:
        A prefetched `tf.data.Dataset` of `(images, labels)`: `float32`
        images of shape `[B, H, W, C]` in `[0, 1]` and `int32` labels of
        shape `[B]`.

    Raises:
        ValueError: If `name`, `split`, `batch_size` or `take` is invalid.
        DatasetNotFoundError: If the dataset cannot be found.
        CorruptDatasetError: If the Fashion-MNIST files are malformed.
    """
    _check_name(name)
    _check_positive_int("batch_size", batch_size)
    if take is not None:
        _check_positive_int("take", take, allow_zero=True)

    if name == "fashion_mnist":
        ds, num_examples = _load_fashion_mnist(split, data_dir, take)
    else:
        ds, num_examples = _load_tfds(name, split, data_dir, take)

    if shuffle:
        ds = ds.shuffle(
            max(num_examples, 1), seed=seed, reshuffle_each_iteration=True
        )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    crop, flip = _AUGMENTATIONS[name] if augment else (False, False)
    if crop or flip:
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
        ds = ds.map(
            lambda batch, batch_seed: _augment_batch(
                *batch, batch_seed, crop=crop, flip=flip
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def read_idx(path):
    """Reads an IDX file (as used by MNIST and Fashion-MNIST).

    The file may be gzip-compressed (detected from its content, not its
    name). The header is a magic number `0x00 0x00 <type code> <ndim>`
    followed by `ndim` big-endian `uint32` dimensions; the payload must hold
    exactly the number of values these dimensions call for.

    Args:
        path: Path of the file.

    Returns:
        A numpy array with the file's shape, in native byte order. `uint8`
        data is returned as a read-only view of the file's bytes.

    Raises:
        FileNotFoundError: If `path` does not exist.
        CorruptDatasetError: If the file is not valid gzip, has a bad magic
            number, or its payload size does not match its header.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorruptDatasetError(
                f"{path}: corrupt or truncated gzip data ({e})."
            ) from e
    dtype, shape, header_size = _parse_idx_header(path, data)
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing data"
        raise CorruptDatasetError(
            f"{path}: the header announces shape {shape} of {dtype.name}, "
            f"i.e. {expected} payload bytes, but the file holds {actual} "
            f"payload bytes ({problem})."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


def _parse_idx_header(path, data):
    """Returns `(dtype, shape, header_size)` parsed from an IDX header."""
    if len(data) < 4:
        raise CorruptDatasetError(
            f"{path}: {len(data)} bytes, too short for an IDX magic number "
            "(4 bytes)."
        )
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 or zero1 or type_code not in _IDX_DTYPES:
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected "
            "0x0000 followed by a type code in "
            f"{[hex(code) for code in _IDX_DTYPES]} and the number of "
            "dimensions."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise CorruptDatasetError(
            f"{path}: truncated IDX header: {ndim} dimensions need "
            f"{header_size} header bytes, the file holds {len(data)}."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    return _IDX_DTYPES[type_code], shape, header_size


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Valid names: {', '.join(DATASETS)}."
        )


def _check_positive_int(arg_name, value, allow_zero=False):
    minimum = 0 if allow_zero else 1
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{arg_name}` must be an integer >= {minimum}. Received: "
            f"{arg_name}={value!r}"
        )


def _to_float(images, labels):
    """Converts a batch of `uint8` images to `float32` in `[0, 1]`."""
    images = tf.cast(images, tf.float32) / 255.0
    return images, tf.cast(labels, tf.int32)


def _augment_batch(images, labels, seed, *, crop, flip):
    """Converts and augments a batch with per-example random crops/flips.

    Args:
        images: `uint8` images `[B, H, W, C]`.
        labels: Labels `[B]`.
        seed: `int64` stateless seed of shape `[2]`.
        crop: Whether to zero-pad by `_CROP_PADDING` and randomly crop back.
        flip: Whether to randomly flip each image left-right.

    Returns:
        `(images, labels)` as `float32` in `[0, 1]` and `int32`.
    """
    images, labels = _to_float(images, labels)
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2)
    )
    if crop:
        images = _random_crop(images, crop_seed, _CROP_PADDING)
    if flip:
        batch_size = tf.shape(images)[0]
        flipped = tf.random.stateless_uniform([batch_size], flip_seed) < 0.5
        images = tf.where(
            flipped[:, None, None, None], tf.reverse(images, axis=[2]), images
        )
    return images, labels


def _random_crop(images, seed, padding):
    """Zero-pads a batch by `padding` and crops each image at random offsets."""
    shape = tf.shape(images)
    batch_size, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(
        images, [[0, 0], [padding, padding], [padding, padding], [0, 0]]
    )
    offsets = tf.random.stateless_uniform(
        [batch_size, 2], seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(height)[None, :]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[None, :]  # [B, W]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    return tf.ensure_shape(cropped, images.shape)


# --- Fashion-MNIST from IDX files -------------------------------------------


def _load_fashion_mnist(split, data_dir, take):
    """Returns `(uint8 dataset, num_examples)` of a Fashion-MNIST split."""
    base, start, stop = _parse_split(split, valid_names=tuple(_IDX_FILES))
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DatasetNotFoundError(
            f"data_dir {os.fspath(data_dir)!r} is not a directory: give the directory that "
            "holds the Fashion-MNIST IDX files (or a TFDS data_dir), or leave it unset to use "
            f"${DATA_DIR_ENV} or {DEBIAN_FASHION_MNIST_DIR}.")
    search_path = _fashion_mnist_search_path(data_dir)
    for directory in search_path:
        files = _find_idx_files(directory, base)
        if files is not None:
            images, labels = _read_idx_pair(*files)
            start, stop = _resolve_slice(split, start, stop, len(labels))
            images, labels = images[start:stop], labels[start:stop]
            if take is not None:
                images, labels = images[:take], labels[:take]
            ds = tf.data.Dataset.from_tensor_slices(
                (images[..., None], labels.astype(np.int32))
            )
            return ds, len(labels)
    try:
        return _load_tfds("fashion_mnist", split, data_dir, take)
    except DatasetNotFoundError as e:
        message = _fashion_mnist_not_found_message(
            search_path, data_dir, e.__cause__
        )
        raise DatasetNotFoundError(message) from e


def _fashion_mnist_search_path(data_dir):
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


def _read_idx_pair(images_path, labels_path):
    """Reads and cross-checks an images file and its labels file."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDatasetError(
            f"{images_path}: expected uint8 images of shape [N, H, W], got "
            f"{images.dtype.name} of shape {images.shape}."
        )
    if labels.ndim != 1:
        raise CorruptDatasetError(
            f"{labels_path}: expected labels of shape [N], got shape "
            f"{labels.shape}."
        )
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} "
            f"holds {len(labels)} labels."
        )
    num_classes = _INFOS["fashion_mnist"].num_classes
    if len(labels) and int(labels.max()) >= num_classes:
        raise CorruptDatasetError(
            f"{labels_path}: label {int(labels.max())} out of range "
            f"[0, {num_classes})."
        )
    return images, labels


def _parse_split(split, valid_names):
    """Parses `"name[start:stop]"` into `(name, start, stop)` strings."""
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if match is None or match["name"] not in valid_names:
        raise ValueError(
            f"Invalid split {split!r}: expected one of {list(valid_names)}, "
            "optionally sliced like 'train[:55000]', 'train[55000:]' or "
            "'train[:10%]'."
        )
    return match["name"], match["start"], match["stop"]


def _resolve_slice(split, start, stop, num_examples):
    """Turns slice bounds (`"100"`, `"-5"`, `"10%"` or `None`) into ints.

    Follows TFDS: percentages round to the closest example, negative values
    count from the end, and out-of-range bounds are an error.
    """
    bounds = []
    for bound, default in ((start, 0), (stop, num_examples)):
        if bound is None:
            bounds.append(default)
            continue
        try:
            if bound.endswith("%"):
                value = round(float(bound[:-1]) * num_examples / 100.0)
            else:
                value = int(bound)
        except ValueError:
            raise ValueError(f"Invalid slice bound {bound!r} in {split!r}.")
        if abs(value) > num_examples:
            raise ValueError(
                f"Split {split!r} is out of range for {num_examples} examples."
            )
        bounds.append(value + num_examples if value < 0 else value)
    return bounds[0], bounds[1]


def _fashion_mnist_not_found_message(search_path, data_dir, tfds_error):
    files = ", ".join(
        f"{stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair
    )
    places = [f"  - {directory}: no IDX files" for directory in search_path]
    if data_dir:
        places.append(f"  (data_dir was given, so ${DATA_DIR_ENV} and "
                      f"{DEBIAN_FASHION_MNIST_DIR} were not searched)")
    elif not os.environ.get(DATA_DIR_ENV):
        places.insert(len(places) - 1, f"  - ${DATA_DIR_ENV}: not set")
    places.append(
        f"  - TFDS data_dir {_tfds_location(data_dir)}: "
        f"{_tfds_reason(tfds_error)}"
    )
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


# --- TFDS --------------------------------------------------------------------


def _load_tfds(name, split, data_dir, take):
    """Returns `(uint8 dataset, num_examples)` of a prepared TFDS split."""
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
            f"{_tfds_location(data_dir)} ({_tfds_reason(e)}). keras_adr "
            "never downloads, and TFDS needs network access to prepare a "
            "dataset: on a machine with network access run "
            f"`tfds build {name} --data_dir=DIR`, then pass DIR as data_dir."
        ) from e
    if take is not None:
        ds = ds.take(take)
    num_examples = int(ds.cardinality())
    if num_examples < 0:  # Unknown or infinite: size the buffer from info.
        num_examples = _INFOS[name].num_train
    return ds, num_examples


def _tfds_location(data_dir):
    if data_dir:
        return os.fspath(data_dir)
    return "(TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"


def _tfds_reason(error):
    """A short description of why TFDS could not load a dataset."""
    if isinstance(error, AssertionError):  # "could not find data in ...".
        return "not prepared there"
    return f"{type(error).__name__}: {error}"
