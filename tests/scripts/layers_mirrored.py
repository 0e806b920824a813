"""keras_adr's layers and callbacks under a 2-replica MirroredStrategy; prints JSON.

Run as a subprocess: the CPU must be split into logical devices before
TensorFlow initialises. A Functional ADRModel with PixelRange, Standardize
and Latent trains for an epoch on augmented CIFAR-shaped data (TFDS mock
data, `data.load(augment=True)`) with RobustAccuracy, DivergenceGuard and
EpochSeconds; then each layer runs per replica in `strategy.run`.
Usage: python layers_mirrored.py <data_dir>
"""

import json
import sys

from keras_adr import distribute

distribute.split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import keras_adr  # noqa: E402
from keras_adr import callbacks, data, layers, presets  # noqa: E402

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.5]


def backbone():
    inputs = keras.Input((32, 32, 3))
    x = layers.PixelRange()(inputs)
    x = layers.Standardize(mean=MEAN, std=STD)(x)
    x = keras.layers.Conv2D(2, 4, strides=4, activation="relu")(x)
    z = layers.Latent(name="codes")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(10)(z))


def per_replica(strategy, fn, values):
    """`fn` on each replica's half of `values`, concatenated in replica order."""
    halves = np.split(values, strategy.num_replicas_in_sync)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(halves[context.replica_id_in_sync_group])
    )
    outputs = strategy.run(tf.function(fn), (inputs,))
    return np.concatenate([np.asarray(t) for t in strategy.experimental_local_results(outputs)])


def main():
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras_adr.ADRModel(backbone(), presets.get("adr_pgd", attack_steps=1))
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    guard, seconds = callbacks.DivergenceGuard(), callbacks.EpochSeconds()
    kwargs = dict(batch_size=16, data_dir=sys.argv[1])
    with tfds.testing.mock_data(num_examples=32):
        train = data.load("cifar10", "train", augment=True, seed=0, drop_remainder=True, **kwargs)
        robust = callbacks.RobustAccuracy(
            data.load("cifar10", "test", **kwargs),
            epsilon=0.03,
            attacks=("pgd2", "apgd_ce2"),
            batch_size=16,
            verbose=0,
        )
        history = model.fit(
            train, epochs=1, verbose=0, shuffle=False, callbacks=[robust, guard, seconds]
        )

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
    (standardize,) = [s for s in model.backbone.layers if isinstance(s, layers.Standardize)]
    logits, z = model(x, return_latent=True)
    replica_logits, replica_z, replica_standardized = (
        per_replica(strategy, lambda images: model(images, return_latent=True)[0], x),
        per_replica(strategy, lambda images: model(images, return_latent=True)[1], x),
        per_replica(strategy, standardize, x),
    )
    bad = x.copy()
    bad[5, 0, 0, 0] = 1.5  # In the second replica's half.
    try:
        per_replica(strategy, layers.PixelRange(name="pixels"), bad)
        pixel_error = None
    except tf.errors.InvalidArgumentError as error:
        pixel_error = error.message
    print(
        json.dumps(
            {
                "num_replicas": strategy.num_replicas_in_sync,
                "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
                "robust_accuracy": robust.last_result.robust_accuracy,
                "robust_examples": robust.last_result.num_examples,
                "diverged": guard.diverged,
                "logits_difference": float(np.abs(replica_logits - np.asarray(logits)).max()),
                "latent_difference": float(np.abs(replica_z - np.asarray(z)).max()),
                "standardize_difference": float(
                    np.abs(replica_standardized - (x - MEAN) / STD).max()
                ),
                "pixel_error": pixel_error,
            }
        )
    )


if __name__ == "__main__":
    main()
