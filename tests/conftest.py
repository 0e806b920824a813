"""Shared fixtures: small deterministic data and a quickly trained tiny model."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
        x[y == c, c * h:(c + 1) * h, :, :] += 0.6
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int32)


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
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model, x[:128], y[:128]
