"""The datasets: their descriptions (`info`) and one loader for all (`load`)."""

import dataclasses

import keras
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
    epoch=None,
):
    """Loads a dataset split as batched `(images, labels)`.

    Fashion-MNIST is read from IDX files (`.gz` or not), searched in order in
    `data_dir`, in `$KERAS_ADR_DATA` and in `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist`); if none holds them, it falls back to
    TFDS. The other datasets come from TFDS. TFDS datasets must already be
    prepared in `data_dir` (or TFDS's default directory): nothing is ever
    downloaded.

    Augmentation (`augment=True`) applies the layers of `augmentation(name,
    seed)` to each example: for `cifar10` and `cifar100` a zero-pad-4 random
    crop and a random horizontal flip, for `svhn_cropped` the crop only, and
    nothing for `fashion_mnist` and `mnist`. It happens in the data
    pipeline, so the attack of an adversarial training step crafts its
    examples on the augmented batch. With `epoch`, the same crops and flips
    are drawn statelessly from `seed`, the epoch and each example's position,
    so that a resumed run sees the images an uninterrupted run saw.

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
        epoch: An optional scalar int64 `tf.Variable` that
            holds the epoch being trained (`keras_adr.callbacks.EpochVariable`
            sets it). Each iteration then shuffles with a seed drawn from
            `seed` and the epoch, so the order of an epoch depends only on
            its number: a run resumed at epoch N sees the order an
            uninterrupted run saw; the same holds for the augmentation.
            None: the dataset reshuffles and augments at each iteration
            from its own generators.

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

    if epoch is not None and seed is None:
        # One seed for the whole run: each epoch's order and crops follow from it.
        seed = int(tf.random.uniform([], 0, 2**31 - 1, dtype=tf.int64))
    if shuffle and epoch is not None:
        ds = _shuffled_by_epoch(ds, num_examples, seed, epoch)
    elif shuffle:
        ds = ds.shuffle(max(num_examples, 1), seed=seed, reshuffle_each_iteration=True)
    if augment and epoch is not None:
        ds = _augmented_by_epoch(ds, name, seed, epoch)
    elif augment and (augmenter := augmentation(name, seed=seed)) is not None:
        # One example at a time (Keras' RandomCrop takes one window per
        # call) and in order (the layers draw from their seeded generators,
        # so a parallel map would hand the draws to examples in any order).
        ds = ds.map(lambda image, label: (augmenter(image[None], training=True)[0], label))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _shuffled_by_epoch(ds, num_examples, seed, epoch):
    """`ds` in an order drawn, at each iteration, from `seed` and `epoch`'s value.

    The whole split is one buffer (as `shuffle`'s is here), permuted by a
    stateless shuffle, which op determinism also allows.
    """

    def permute(*examples):
        # Read when an iteration starts, after `fit` has set the epoch.
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch.read_value(), tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(examples[0])[0]), key)
        return tuple(tf.gather(t, order) for t in examples)

    shuffled = ds.batch(max(num_examples, 1)).map(permute).unbatch()
    # `unbatch` forgets the count; Keras needs it to know an epoch's steps
    # (else it warns "Your input ran out of data" at every epoch's end).
    return shuffled.apply(tf.data.experimental.assert_cardinality(num_examples))


def _augmented_by_epoch(ds, name, seed, epoch):
    """`ds` with `augmentation(name)`'s crops and flips, drawn statelessly.

    Each example's draws depend only on `seed`, the epoch's value and the
    example's position in the epoch, so a run resumed at epoch N sees the
    images an uninterrupted run saw (the layers' generators would restart
    from their seed), and examples can be augmented in parallel.
    """
    crop, flip = _AUGMENTATIONS[name]
    if not (crop or flip):
        return ds
    shape = _INFOS[name].input_shape
    pad = [[_CROP_PADDING, _CROP_PADDING], [_CROP_PADDING, _CROP_PADDING], [0, 0]]
    fold_in = tf.random.experimental.stateless_fold_in

    def augment(position, example):
        image, label = example
        key = tf.constant([seed, 0], tf.int64)
        key = fold_in(fold_in(key, tf.cast(epoch.read_value(), tf.int64)), position)
        if crop:
            image = tf.image.stateless_random_crop(tf.pad(image, pad), shape, fold_in(key, 0))
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, fold_in(key, 1))
        return image, label

    return ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def augmentation(name, seed=None):
    """The training augmentation of a dataset, as Keras preprocessing layers.

    - `cifar10`, `cifar100`: `ZeroPadding2D(4)`, `RandomCrop` back to 32x32
      and a horizontal `RandomFlip` (as torchvision's
      `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`).
    - `svhn_cropped`: the same padded random crop, no flip (digits).
    - `fashion_mnist`, `mnist`: none.

    The layers work on batches `[B, H, W, C]` of pixels (uint8 or float) and
    return float32 (whatever the global dtype policy). `RandomCrop` takes one
    window per call, so call it on one image (`[1, H, W, C]`) at a time for
    per-example crops, as `load(..., augment=True)` does. The randomness
    comes from the layers' seeded generators: calls in the same order give
    the same images, and each call draws afresh.

    Args:
        name: Dataset name, one of `DATASETS`.
        seed: Seed of the random crops and flips, or None for fresh ones.

    Returns:
        A `keras.Sequential` of the augmentation layers, or None for a
        dataset without augmentation.
    """
    _check_name(name)
    crop, flip = _AUGMENTATIONS[name]
    if not (crop or flip):
        return None
    height, width, _ = _INFOS[name].input_shape
    crop_seed, flip_seed = (None, None) if seed is None else (seed, seed + 1)
    layers = []
    if crop:
        layers += [
            keras.layers.ZeroPadding2D(_CROP_PADDING, dtype="float32"),
            keras.layers.RandomCrop(height, width, seed=crop_seed, dtype="float32"),
        ]
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=flip_seed, dtype="float32"))
    return keras.Sequential(layers, name=f"{name}_augmentation")


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
    """Converts a batch of images (`uint8`, or augmented `float32` pixels) to `[0, 1]`."""
    images = tf.cast(images, tf.float32) / 255.0
    return images, tf.cast(labels, tf.int32)
