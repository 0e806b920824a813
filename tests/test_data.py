"""Tests for keras_adr.data."""

import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import data

_DEBIAN_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_bytes(array):
    """Encodes an array as IDX, independently of `data.read_idx`."""
    codes = {np.uint8: 0x08, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, payload, gz=False):
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return path


def _fake_fashion_mnist(directory, num_train=10, num_test=6, gz=True):
    """Writes tiny Fashion-MNIST IDX files; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # Both extremes.
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write(
            os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"),
            _idx_bytes(images),
            gz,
        )
        _write(
            os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"),
            _idx_bytes(labels),
            gz,
        )
        arrays[split] = (images, labels)
    return arrays


def _collect(ds):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """Keeps the Debian directory and $KERAS_ADR_DATA out of the search."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(data.fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", str(empty))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# --- read_idx -----------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 255], dtype=np.uint8),
        np.array([[-2, 300], [1, -32768]], dtype=np.int16),
        np.array([1.5, -2.25], dtype=np.float32),
    ],
)
def test_read_idx_round_trip(tmp_path, array, gz):
    path = _write(tmp_path / "x.idx", _idx_bytes(array), gz)
    result = data.read_idx(path)
    assert result.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(result, array)


def test_read_idx_truncated(tmp_path):
    payload = _idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = _write(tmp_path / "short.idx", payload[:-5])
    with pytest.raises(data.CorruptDatasetError, match="48.*43") as e:
        data.read_idx(path)
    assert "short.idx" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_read_idx_trailing_bytes(tmp_path):
    payload = _idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00"
    with pytest.raises(data.CorruptDatasetError, match="trailing"):
        data.read_idx(_write(tmp_path / "long.idx", payload))


def test_read_idx_truncated_gzip(tmp_path):
    compressed = gzip.compress(_idx_bytes(np.zeros((50, 50), np.uint8)))
    path = _write(tmp_path / "cut.idx.gz", compressed[:-10])
    with pytest.raises(data.CorruptDatasetError, match="cut.idx.gz"):
        data.read_idx(path)


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"PK\x03\x04"])
def test_read_idx_bad_magic(tmp_path, header):
    path = _write(tmp_path / "bad.idx", header + struct.pack(">I", 0))
    with pytest.raises(data.CorruptDatasetError, match="bad.idx.*magic"):
        data.read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = _write(tmp_path / "hdr.idx", b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(data.CorruptDatasetError, match="header"):
        data.read_idx(path)


def test_count_mismatch(tmp_path, no_default_dirs):
    _fake_fashion_mnist(tmp_path, gz=False)
    labels = np.zeros(9, np.uint8)  # 10 images.
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels))
    with pytest.raises(data.CorruptDatasetError, match="10 images.*9 labels"):
        data.load("fashion_mnist", "train", batch_size=4, data_dir=tmp_path)


# --- Fashion-MNIST from IDX files ---------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_data_dir(tmp_path, no_default_dirs, gz):
    arrays = _fake_fashion_mnist(tmp_path, gz=gz)
    ds = data.load("fashion_mnist", "train", batch_size=4, data_dir=tmp_path)
    batches = list(ds)
    assert [int(x.shape[0]) for x, _ in batches] == [4, 4, 2]
    images, labels = _collect(ds)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.shape == (10, 28, 28, 1) and labels.shape == (10,)
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_allclose(images[..., 0], arrays["train"][0] / np.float32(255), rtol=1e-6)
    np.testing.assert_array_equal(labels, arrays["train"][1])

    test_images, _ = _collect(data.load("fashion_mnist", "test", batch_size=4, data_dir=tmp_path))
    assert test_images.shape == (6, 28, 28, 1)


def test_env_var_is_searched(tmp_path, no_default_dirs, monkeypatch):
    _fake_fashion_mnist(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    _, labels = _collect(data.load("fashion_mnist", "test", batch_size=8))
    assert labels.shape == (6,)


def test_data_dir_comes_before_env_var(tmp_path, no_default_dirs, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    _fake_fashion_mnist(first, num_train=3)
    _fake_fashion_mnist(second, num_train=5)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(second))
    _, labels = _collect(data.load(batch_size=8, data_dir=first))
    assert labels.shape == (3,)


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train[:3]", np.arange(0, 3)),
        ("train[7:]", np.arange(7, 10)),
        ("train[2:5]", np.arange(2, 5)),
        ("train[-2:]", np.arange(8, 10)),
        ("train[:30%]", np.arange(0, 3)),
        ("train[90%:]", np.arange(9, 10)),
        ("test[:1]", np.arange(0, 1)),
    ],
)
def test_fashion_mnist_slices(tmp_path, no_default_dirs, split, expected):
    _fake_fashion_mnist(tmp_path)  # Labels are the indices (mod 10).
    ds = data.load("fashion_mnist", split, batch_size=4, data_dir=tmp_path)
    np.testing.assert_array_equal(_collect(ds)[1], expected)


@pytest.mark.parametrize("split", ["validation", "train[:11]", "train[1:2:3]", "train[a:]", 3])
def test_fashion_mnist_bad_split(tmp_path, no_default_dirs, split):
    _fake_fashion_mnist(tmp_path)
    with pytest.raises(ValueError):
        data.load("fashion_mnist", split, batch_size=4, data_dir=tmp_path)


def test_take_before_shuffle(tmp_path, no_default_dirs):
    _fake_fashion_mnist(tmp_path)
    ds = data.load(
        "fashion_mnist",
        "train[2:]",
        batch_size=16,
        data_dir=tmp_path,
        take=4,
        shuffle=True,
        seed=1,
    )
    first, second = _collect(ds)[1], _collect(ds)[1]
    np.testing.assert_array_equal(np.sort(first), [2, 3, 4, 5])
    np.testing.assert_array_equal(np.sort(second), [2, 3, 4, 5])


def test_shuffle_is_seeded_and_reshuffles(tmp_path, no_default_dirs):
    _fake_fashion_mnist(tmp_path, num_train=200)

    def make():
        return data.load(
            "fashion_mnist",
            "train",
            batch_size=64,
            data_dir=tmp_path,
            shuffle=True,
            seed=3,
        )

    ds = make()
    epoch1, epoch2 = _collect(ds)[0], _collect(ds)[0]
    assert not np.array_equal(epoch1, epoch2)  # Reshuffled each iteration.
    np.testing.assert_array_equal(epoch1, _collect(make())[0])  # Seeded.
    flat = lambda x: np.sort(x.reshape(len(x), -1), axis=0)  # noqa: E731
    np.testing.assert_array_equal(flat(epoch1), flat(epoch2))


def test_drop_remainder_and_prefetch(tmp_path, no_default_dirs):
    _fake_fashion_mnist(tmp_path)
    ds = data.load(
        "fashion_mnist",
        "train",
        batch_size=4,
        data_dir=tmp_path,
        drop_remainder=True,
    )
    assert ds.element_spec[0].shape.as_list() == [4, 28, 28, 1]
    assert ds.element_spec[1] == tf.TensorSpec([4], tf.int32)
    assert [int(y.shape[0]) for _, y in ds] == [4, 4]


def test_augment_is_noop_for_fashion_mnist(tmp_path, no_default_dirs):
    _fake_fashion_mnist(tmp_path)
    kwargs = dict(batch_size=4, data_dir=tmp_path)
    plain = _collect(data.load("fashion_mnist", "train", **kwargs))[0]
    augmented = _collect(data.load("fashion_mnist", "train", augment=True, seed=0, **kwargs))[0]
    np.testing.assert_array_equal(plain, augmented)


def test_missing_dataset_message(tmp_path, no_default_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load("fashion_mnist", "train", batch_size=4, data_dir=empty)
    message = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "fashion_mnist" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert str(empty) in message
    assert data.fashion_mnist.DEBIAN_FASHION_MNIST_DIR in message  # as patched
    assert data.DATA_DIR_ENV in message


def test_missing_tfds_dataset(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="network"):
        data.load("cifar10", "train", batch_size=4, data_dir=tmp_path)


@pytest.mark.parametrize("name", ["imagenet", "Fashion_MNIST", ""])
def test_unknown_name(name):
    with pytest.raises(ValueError, match="fashion_mnist.*svhn_cropped"):
        data.load(name, "train", batch_size=4)
    with pytest.raises(ValueError, match="cifar100"):
        data.info(name)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, None, True])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        data.load("fashion_mnist", "train", batch_size=batch_size)


@pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, f)) for f in _DEBIAN_FILES),
    reason="Debian's dataset-fashion-mnist is not installed "
    "(apt-get install -y dataset-fashion-mnist).",
)
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    for split, num_examples in (("train", 60000), ("test", 10000)):
        ds = data.load("fashion_mnist", split, batch_size=num_examples)
        ((images, labels),) = list(ds)
        assert images.shape == (num_examples, 28, 28, 1)
        assert labels.shape == (num_examples,)
        counts = np.bincount(labels.numpy(), minlength=10)
        np.testing.assert_array_equal(counts, [num_examples // 10] * 10)
        assert float(tf.reduce_max(images)) <= 1.0
        assert float(tf.reduce_min(images)) >= 0.0


# --- info -------------------------------------------------------------------


def test_info():
    fashion = data.info("fashion_mnist")
    assert fashion.class_names[0] == "T-shirt/top"
    assert fashion.class_names[9] == "Ankle boot"
    assert fashion.input_shape == (28, 28, 1)
    assert (fashion.num_train, fashion.num_test) == (60000, 10000)
    assert data.DEFAULT_DATASET == "fashion_mnist"
    with pytest.raises(AttributeError):
        fashion.num_classes = 3  # Frozen.
    for name in data.DATASETS:
        assert len(data.info(name).class_names) == data.info(name).num_classes


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn_cropped"])
def test_info_matches_tfds_metadata(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds_info = tfds.builder(name).info  # Static metadata, no data needed.
    ours = data.info(name)
    assert ours.num_classes == tfds_info.features["label"].num_classes
    assert ours.input_shape == tfds_info.features["image"].shape
    # TFDS only learns CIFAR's label names from the downloaded files.


def test_cifar100_class_names():
    names = data.info("cifar100").class_names
    assert len(set(names)) == 100
    assert list(names) == sorted(names)  # CIFAR-100 fine labels: A-Z order.
    assert (names[0], names[30], names[99]) == ("apple", "dolphin", "worm")


# --- TFDS ---------------------------------------------------------------------


def _windows(image, padding, flip):
    """All crops of the zero-padded `image` (and of its mirror if `flip`)."""
    h, w = image.shape[:2]
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    sources = [padded, padded[:, ::-1]] if flip else [padded]
    return [
        src[i : i + h, j : j + w]
        for src in sources
        for i in range(2 * padding + 1)
        for j in range(2 * padding + 1)
    ]


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock(tmp_path, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        ds = data.load(name, "train", batch_size=4, data_dir=tmp_path, take=6)
        images, labels = _collect(ds)
    assert [int(x.shape[0]) for x, _ in ds] == [4, 2]
    assert images.shape == (6,) + shape and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < data.info(name).num_classes


def test_fashion_mnist_falls_back_to_tfds(tmp_path, no_default_dirs):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load("fashion_mnist", "test", batch_size=8, data_dir=tmp_path)
        images, _ = _collect(ds)
    assert images.shape == (5, 28, 28, 1)


@pytest.mark.parametrize(
    "name, flip",
    [("cifar10", True), ("cifar100", True), ("svhn_cropped", False)],
)
def test_tfds_augmentation(tmp_path, name, flip):
    tfds = pytest.importorskip("tensorflow_datasets")
    kwargs = dict(batch_size=8, data_dir=tmp_path)
    with tfds.testing.mock_data(num_examples=16):
        plain, labels = _collect(data.load(name, "train", **kwargs))
        augmented, aug_labels = _collect(data.load(name, "train", augment=True, seed=5, **kwargs))
        again, _ = _collect(data.load(name, "train", augment=True, seed=5, **kwargs))
    assert augmented.shape == plain.shape == (16, 32, 32, 3)
    assert augmented.dtype == np.float32
    assert 0.0 <= augmented.min() and augmented.max() <= 1.0
    np.testing.assert_array_equal(labels, aug_labels)
    np.testing.assert_array_equal(augmented, again)  # Seeded.
    assert not np.array_equal(augmented, plain)
    # Every augmented image is a window of the zero-padded original, mirrored
    # only where flips are allowed.
    num_flipped = 0
    for original, result in zip(plain, augmented):
        windows = _windows(original, padding=4, flip=flip)
        matches = [i for i, w in enumerate(windows) if np.array_equal(w, result)]
        assert matches, "augmented image is not a padded crop of the original"
        num_flipped += min(matches) >= 81
    if flip:
        assert 0 < num_flipped < 16


def test_augmentation_is_keras_layers_seeded_per_example_and_per_epoch(tmp_path):
    import keras

    tfds = pytest.importorskip("tensorflow_datasets")
    assert data.augmentation("fashion_mnist") is None and data.augmentation("mnist") is None
    kinds = [type(layer) for layer in data.augmentation("cifar10", seed=0).layers]
    assert kinds == [keras.layers.ZeroPadding2D, keras.layers.RandomCrop, keras.layers.RandomFlip]
    kinds = [type(layer) for layer in data.augmentation("svhn_cropped", seed=0).layers]
    assert kinds == [keras.layers.ZeroPadding2D, keras.layers.RandomCrop]

    def two_epochs(seed):
        ds = data.load(
            "cifar10", "train", batch_size=16, data_dir=tmp_path, augment=True, seed=seed
        )
        return [_collect(ds)[0] for _ in range(2)]

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")  # Pixels stay float32.
    try:
        with tfds.testing.mock_data(num_examples=16):
            plain, _ = _collect(data.load("cifar10", "train", batch_size=16, data_dir=tmp_path))
            first, second = two_epochs(seed=3)
            again = two_epochs(seed=3)
            other, _ = two_epochs(seed=4)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(np.stack(again), np.stack([first, second]))
    assert not np.array_equal(first, second)  # Each epoch draws afresh...
    assert not np.array_equal(first, other)  # ...and the seed matters.
    # Each example gets its own window (81 offsets, and their mirrors).
    offsets = set()
    for original, result in zip(plain, first):
        windows = _windows(original, padding=4, flip=True)
        offsets.add(min(i for i, w in enumerate(windows) if np.array_equal(w, result)) % 81)
    assert len(offsets) > 1


def test_explicit_data_dir_is_the_only_place_searched(tmp_path, no_default_dirs, monkeypatch):
    """A named directory is used or rejected, never replaced by another copy."""
    elsewhere, empty = tmp_path / "elsewhere", tmp_path / "empty"
    elsewhere.mkdir()
    empty.mkdir()
    _fake_fashion_mnist(elsewhere)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(elsewhere))
    monkeypatch.setattr(data.fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", str(elsewhere))
    with pytest.raises(data.DatasetNotFoundError, match="were not searched"):
        data.load("fashion_mnist", "train", batch_size=4, data_dir=empty)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a dataset")
    with pytest.raises(data.DatasetNotFoundError, match="not a directory"):
        data.load("fashion_mnist", "train", batch_size=4, data_dir=a_file)
    # Unset, the fallbacks still apply.
    _, labels = _collect(data.load("fashion_mnist", "test", batch_size=8))
    assert labels.shape == (6,)


def test_augmentation_by_epoch_depends_only_on_the_epoch(tmp_path):
    """With an epoch variable, an epoch's crops and flips are the same in a
    resumed run as in an uninterrupted one: they follow the epoch, not the
    iterations before it."""
    tfds = pytest.importorskip("tensorflow_datasets")
    epoch = tf.Variable(0, dtype=tf.int64)

    def epoch_images(number, seed=3):
        epoch.assign(number)
        ds = data.load(
            "cifar10",
            "train",
            batch_size=16,
            data_dir=tmp_path,
            augment=True,
            seed=seed,
            epoch=epoch,
        )
        return _collect(ds)[0]

    with tfds.testing.mock_data(num_examples=16):
        plain, _ = _collect(data.load("cifar10", "train", batch_size=16, data_dir=tmp_path))
        first, second = epoch_images(0), epoch_images(1)
        resumed = epoch_images(1)  # A new pipeline, as after a restart, at epoch 1.
        other = epoch_images(0, seed=4)
    np.testing.assert_array_equal(resumed, second)
    assert not np.array_equal(first, second)  # Each epoch draws afresh...
    assert not np.array_equal(first, other)  # ...and the seed matters.
    offsets, num_flipped = set(), 0
    for original, result in zip(plain, first):
        windows = _windows(original, padding=4, flip=True)
        matches = [i for i, w in enumerate(windows) if np.array_equal(w, result)]
        assert matches, "augmented image is not a padded crop of the original"
        offsets.add(min(matches) % 81)
        num_flipped += min(matches) >= 81
    assert len(offsets) > 1 and 0 < num_flipped < 16
