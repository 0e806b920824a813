"""Classifier architectures, each with a `keras_adr.layers.Latent` layer named `"latent"`.

Every builder returns a functional `keras.Model` mapping float pixels in
[0, 1] to logits. Any normalisation is a layer inside the model, so attack
budgets are always in pixel units and exported models take raw pixels.
"""

import keras
from keras import layers

from keras_adr.layers import Latent, Standardize

LATENT_LAYER = "latent"
# The in-model normalisation of the colour-image builders; `adr-train` adapts
# it to the training data (`keras_adr.layers.Standardize`).
STANDARDIZE_LAYER = "standardize"
ARCHITECTURES = ("small_cnn", "cifar_cnn", "resnet18", "wide_resnet")


def _check_shapes(input_shape, num_classes):
    if len(tuple(input_shape)) != 3 or any(d is None or d < 1 for d in input_shape):
        raise ValueError(f"`input_shape` must be (height, width, channels); got {input_shape!r}.")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2; got {num_classes!r}.")


def small_cnn(input_shape=(28, 28, 1), num_classes=10, name="small_cnn"):
    """The MNIST CNN of the ADR and TRADES papers.

    conv32-conv32-pool-conv64-conv64-pool, latent = flattened features
    (1024 for 28x28 inputs), then fc200-fc200-logits.

    Args:
        input_shape: `(H, W, C)` of the images.
        num_classes: Number of classes.
        name: Model name.

    Returns:
        A functional `keras.Model`.
    """
    _check_shapes(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for filters in (32, 32):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    for filters in (64, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = Latent(name=LATENT_LAYER)(layers.Flatten()(x))
    for units in (200, 200):
        x = layers.Dense(units, activation="relu")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def cifar_cnn(input_shape=(32, 32, 3), num_classes=10, name="cifar_cnn"):
    """The CIFAR CNN of the Carlini-Wagner / TRADES papers, with BatchNorm.

    conv64-conv64-pool-conv128-conv128-pool, latent = flattened features,
    then fc256-fc256-logits.
    """
    _check_shapes(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="images")
    x = Standardize(name=STANDARDIZE_LAYER)(inputs)
    for block_filters in (64, 128):
        for _ in range(2):
            x = layers.Conv2D(block_filters, 3, use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = Latent(name=LATENT_LAYER)(layers.Flatten()(x))
    for units in (256, 256):
        x = layers.Dense(units, activation="relu")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _batch_norm(sync):
    if sync:
        return layers.BatchNormalization(synchronized=True)
    return layers.BatchNormalization()


def _preact_block(x, filters, stride, sync_batchnorm):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv-BN-ReLU-conv."""
    preact = layers.ReLU()(_batch_norm(sync_batchnorm)(x))
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(preact)
    else:
        shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(preact)
    y = layers.ReLU()(_batch_norm(sync_batchnorm)(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    return layers.Add()([y, shortcut])


def _head(x, num_classes, sync_batchnorm):
    x = layers.ReLU()(_batch_norm(sync_batchnorm)(x))
    x = Latent(name=LATENT_LAYER)(layers.GlobalAveragePooling2D()(x))
    return layers.Dense(num_classes, name="logits")(x)


def resnet18(input_shape=(32, 32, 3), num_classes=10, sync_batchnorm=False, name="resnet18"):
    """Pre-activation ResNet-18; latent = pooled features (512) before the classifier.

    Args:
        input_shape: `(H, W, C)` of the images.
        num_classes: Number of classes.
        sync_batchnorm: Use synchronized BatchNormalization (multi-replica).
        name: Model name.

    Returns:
        A functional `keras.Model`.
    """
    _check_shapes(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="images")
    x = Standardize(name=STANDARDIZE_LAYER)(inputs)
    x = layers.Conv2D(64, 3, padding="same", use_bias=False)(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, stride, sync_batchnorm)
    return keras.Model(inputs, _head(x, num_classes, sync_batchnorm), name=name)


def wide_resnet(
    input_shape=(32, 32, 3), num_classes=10, depth=34, width=10, sync_batchnorm=False, name=None
):
    """Wide ResNet-`depth`-`width` (Zagoruyko & Komodakis 2016), pre-activation.

    Args:
        input_shape: `(H, W, C)` of the images.
        num_classes: Number of classes.
        depth: Total depth; `(depth - 4)` must be divisible by 6.
        width: Widening factor.
        sync_batchnorm: Use synchronized BatchNormalization.
        name: Model name (default `wide_resnet_<depth>_<width>`).

    Returns:
        A functional `keras.Model`; latent = pooled features before the classifier.

    Raises:
        ValueError: If `depth` is not of the form 6n + 4.
    """
    _check_shapes(input_shape, num_classes)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"`depth` must be 6n + 4 with n >= 1 (e.g. 28, 34); got {depth}.")
    blocks_per_stage = (depth - 4) // 6
    inputs = keras.Input(input_shape, name="images")
    x = Standardize(name=STANDARDIZE_LAYER)(inputs)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, stride, sync_batchnorm)
    name = name or f"wide_resnet_{depth}_{width}"
    return keras.Model(inputs, _head(x, num_classes, sync_batchnorm), name=name)


_BUILDERS = {
    "small_cnn": small_cnn,
    "cifar_cnn": cifar_cnn,
    "resnet18": resnet18,
    "wide_resnet": wide_resnet,
}


def get(name, **kwargs):
    """Builds the architecture `name` (one of `ARCHITECTURES`) with `kwargs`.

    Raises:
        ValueError: For an unknown architecture name.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}; valid models: {', '.join(ARCHITECTURES)}.")
    return _BUILDERS[name](**kwargs)
