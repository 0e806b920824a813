"""Shared fixtures: small deterministic data and a quickly trained tiny model."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process (and the programs it starts) under
    # `pytest -n`: with the default of one per core in every process, the
    # processes oversubscribe the cores (7% slower, test_train_cli.py on 2 cores).
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def blob_data(n=256, seed=0, shape=(8, 8, 1), num_classes=3):
    """Images in [0, 1] whose class sets the brightness of a class-specific patch."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.uniform(0.0, 0.3, size=(n, *shape))
    h = shape[0] // num_classes
    for c in range(num_classes):
        x[y == c, c * h : (c + 1) * h, :, :] += 0.6
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int32)


def fashion_arrays(train_examples=1500, test_examples=200):
    """The first Fashion-MNIST train and test examples as numpy arrays, or skip."""
    from keras_adr import data

    try:
        train = data.load("fashion_mnist", "train", batch_size=train_examples, take=train_examples)
        test = data.load("fashion_mnist", "test", batch_size=test_examples, take=test_examples)
    except data.DatasetNotFoundError as error:
        pytest.skip(
            f"Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): {error}"
        )
    (x_train, y_train), (x, y) = next(iter(train)), next(iter(test))
    return (x_train.numpy(), y_train.numpy()), (x.numpy(), y.numpy())


def tiny_cnn(input_shape=(8, 8, 1), num_classes=3, batchnorm=False):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten(name="latent")(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="session")
def trained_tiny():
    """A tiny CNN trained (clean) to high accuracy on the blob data."""
    keras.utils.set_random_seed(0)
    x, y = blob_data(512)
    model = tiny_cnn(batchnorm=True)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model, x[:128], y[:128]
