"""One ADR train step on 1 device and on 2 logical CPU replicas; prints JSON.

Run as a subprocess: the CPU must be split before TensorFlow initialises.
Usage: python mirrored_step.py <pairwise_scope> [<global_compactness_features>]
With `replica`, also one device's step on each replica's half of the batch.
"""

import json
import sys

from keras_adr import distribute

distribute.split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_adr  # noqa: E402
from keras_adr import presets  # noqa: E402


def deterministic_adversary(x, y, loss=None, epsilon=None, seed=None):
    # A fixed function of x: each replica perturbs its own shard exactly as
    # one device perturbs the same examples.
    return tf.clip_by_value(x + 0.05 * tf.sin(37.0 * x + 1.0), 0.0, 1.0)


def one_step(strategy, weights, x, y, scope, features):
    config = presets.get(
        "adr_pgd",
        label_propagation=0.5,
        propagation_neighbors=5,
        pairwise_scope=scope,
        global_compactness_features=features,
    )
    keras.utils.set_random_seed(1)  # the same sampling salt in both models
    with strategy.scope():
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.Flatten(name="latent")(h)
        h = keras.layers.Dense(16, activation="relu")(h)
        backbone = keras.Model(inputs, keras.layers.Dense(3)(h))
        backbone.set_weights(weights)
        model = keras_adr.ADRModel(backbone, config)
        model.adversarial_examples = deterministic_adversary
        # User metrics too, clean and adversarial: each replica updates them
        # on its shard, and the results must be one device's.
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2)],
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
    history = model.fit(dataset, epochs=1, verbose=0, validation_data=dataset)
    return [w.tolist() for w in backbone.get_weights()], {
        k: float(v[-1]) for k, v in history.history.items()
    }


def main():
    scope = sys.argv[1]
    features = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Flatten(name="latent")(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    weights = keras.Model(inputs, keras.layers.Dense(3)(h)).get_weights()

    single = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), weights, x, y, scope, features)
    mirrored_strategy = distribute.get_strategy("mirrored")
    assert mirrored_strategy.num_replicas_in_sync == 2, mirrored_strategy.num_replicas_in_sync
    mirrored = one_step(mirrored_strategy, weights, x, y, scope, features)
    initial = [w.tolist() for w in weights]
    out = {"initial": initial, "single": single, "mirrored": mirrored}
    if scope == "replica":
        # Each replica's half of the batch, on one device with the global scope:
        # what the replicas of a per-replica scope compute, each on its own.
        device = tf.distribute.OneDeviceStrategy("/cpu:0")
        half = len(x) // 2
        out["halves"] = [
            one_step(device, weights, x[i : i + half], y[i : i + half], "global", features)
            for i in (0, half)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
