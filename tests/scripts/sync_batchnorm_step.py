"""One ADR step of resnet18 with synchronized BatchNorm on 1 device and on 2 CPU replicas.

Run as a subprocess: the CPU must be split before TensorFlow initialises.
Prints JSON: the largest difference from the one-device step of the weights
(trainable and BatchNorm moving statistics) after the step, for synchronized
and for plain (per-replica) BatchNorm, and the step's loss.
Usage: python sync_batchnorm_step.py
"""

import json

from keras_adr import distribute

distribute.split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_adr  # noqa: E402
from keras_adr import models, presets  # noqa: E402

SHAPE = (16, 16, 3)
BATCH = 8


def deterministic_adversary(x, y, loss=None, epsilon=None, seed=None):
    return tf.clip_by_value(x + 0.03 * tf.sin(37.0 * x + 1.0), 0.0, 1.0)


def one_step(strategy, sync_batchnorm, weights, x, y):
    config = presets.get("adr_pgd", attack_epsilon=0.03)
    with strategy.scope():
        backbone = models.get(
            "resnet18", input_shape=SHAPE, num_classes=10, sync_batchnorm=sync_batchnorm
        )
        backbone.set_weights(weights)
        model = keras_adr.ADRModel(backbone, config)
        model.adversarial_examples = deterministic_adversary
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    distribute.patch_keras_fit(model)
    history = model.fit(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0
    )
    return backbone.get_weights(), float(history.history["loss"][-1])


def max_difference(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


def main():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    keras.utils.set_random_seed(0)
    initial = models.get("resnet18", input_shape=SHAPE, num_classes=10).get_weights()

    single, single_loss = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), False, initial, x, y)
    mirrored = distribute.get_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2, mirrored.num_replicas_in_sync
    synced, synced_loss = one_step(mirrored, True, initial, x, y)
    plain, plain_loss = one_step(mirrored, False, initial, x, y)
    print(
        json.dumps(
            {
                "num_replicas": mirrored.num_replicas_in_sync,
                "step_change": max_difference(initial, single),
                "sync_difference": max_difference(single, synced),
                "plain_difference": max_difference(single, plain),
                "losses": {"single": single_loss, "sync": synced_loss, "plain": plain_loss},
            }
        )
    )


if __name__ == "__main__":
    main()
