"""The datasets: their descriptions (`info`) and one loader for all (`load`)."""

import dataclasses

import numpy as np
import tensorflow as tf

from keras_adr.data import fashion_mnist, tfds

DEFAULT_DATASET = "fashion_mnist"
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn_cropped")

# Padding, in pixels on each side, of the random-crop augmentation.
_CROP_PADDING = 4


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
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), _CIFAR10_CLASSES, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), _CIFAR100_CLASSES, 50000, 10000),
    "svhn_cropped": DatasetInfo("svhn_cropped", 10, (32, 32, 3), _DIGITS, 73257, 26032),
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
        ds, num_examples = fashion_mnist.load(split, data_dir, take, _INFOS[name])
    else:
        ds, num_examples = tfds.load(name, split, data_dir, take, _INFOS[name].num_train)

    if shuffle:
        ds = ds.shuffle(max(num_examples, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    crop, flip = _AUGMENTATIONS[name] if augment else (False, False)
    if crop or flip:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
        ds = ds.map(
            lambda batch, batch_seed: _augment_batch(*batch, batch_seed, crop=crop, flip=flip),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(DATASETS)}.")


def _check_positive_int(arg_name, value, allow_zero=False):
    minimum = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"`{arg_name}` must be an integer >= {minimum}. Received: {arg_name}={value!r}"
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
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if crop:
        images = _random_crop(images, crop_seed, _CROP_PADDING)
    if flip:
        batch_size = tf.shape(images)[0]
        flipped = tf.random.stateless_uniform([batch_size], flip_seed) < 0.5
        images = tf.where(flipped[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images, labels


def _random_crop(images, seed, padding):
    """Zero-pads a batch by `padding` and crops each image at random offsets."""
    shape = tf.shape(images)
    batch_size, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [batch_size, 2], seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(height)[None, :]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[None, :]  # [B, W]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    return tf.ensure_shape(cropped, images.shape)
