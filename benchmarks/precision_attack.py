"""Does a low-precision model weaken the attack? The measurement behind `attacks._gradient`.

Trains `small_cnn` on Fashion-MNIST in float32 (clean training, which gives
confident logits, and PGD-AT), then attacks the same weights computing in
float32, mixed_bfloat16 and mixed_float16 (`keras_adr.precision.with_policy`)
with PGD-20 (L-inf 0.1, step 0.0125, no random start, so the runs differ
only by precision), two ways:

* `naive`: the gradient of the float32 cross-entropy of the float32-cast
  logits, taken straight through the model (keras-adr before issue 14);
* `scaled`: `keras_adr.attacks.pgd`, whose loss gradient at the logits is
  rescaled per example by a power of two before it flows back
  (`keras_adr.attacks._gradient.input_gradient`).

It reports the fraction of test images whose input gradient at the clean
image is exactly zero, PGD-20 accuracy, and seconds per attack. A third
option, attacking a float32 copy of a mixed-precision model, is the float32
row (it gives up the low-precision speed, which a training attack needs).

Usage (about 5 minutes on 2 cores; float16 is emulated on CPUs):
    nice -n 10 python -m benchmarks.precision_attack --examples=500 \\
        --output=benchmarks/results/precision_attack.json
"""

import os
import sys
import time

from absl import app, flags

if not __package__:  # `python benchmarks/precision_attack.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 500, "Test images attacked.")
flags.DEFINE_integer("train_examples", 20000, "Training images (one epoch each model).")
flags.DEFINE_integer("threads", 0, "TensorFlow threads (0 = TensorFlow's choice).")
flags.DEFINE_string("output", None, "JSON file of the rows (and a .md table beside it).")

EPSILON, STEPS = 0.1, 20
STEP_SIZE = 2.5 * EPSILON / STEPS
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def _train(defense, train_ds):
    import keras

    import keras_adr
    from benchmarks.robustness_presets import PGD5_RECIPE, pinned_config

    keras.utils.set_random_seed(0)
    # The recipe of the committed results, whatever adr-train's defaults are.
    config = pinned_config(defense, attack_steps=PGD5_RECIPE.attack_steps)
    model = keras_adr.ADRModel(keras_adr.models.small_cnn(), config)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train_ds, epochs=1, verbose=0, shuffle=False)
    return model.backbone


def _naive_pgd(model, x, y):
    import tensorflow as tf

    @tf.function
    def attack(x, y):
        def gradient(x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = tf.cast(model(x_adv, training=False), tf.float32)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            return tape.gradient(loss, x_adv)

        x_adv = x
        for _ in range(STEPS):
            x_adv = x_adv + STEP_SIZE * tf.sign(gradient(x_adv))
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - EPSILON, x + EPSILON), 0.0, 1.0)
        return x_adv, gradient(x)

    return attack(x, y)


def _scaled_pgd(model, x, y):
    import tensorflow as tf

    from keras_adr import attacks
    from keras_adr.attacks._gradient import input_gradient

    @tf.function
    def attack(x, y):
        x_adv = attacks.pgd(
            model, x, y, epsilon=EPSILON, step_size=STEP_SIZE, steps=STEPS, random_start=False
        )
        loss_fn = lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
        return x_adv, input_gradient(lambda images: model(images, training=False), loss_fn, x)[2]

    return attack(x, y)


def _accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    import numpy as np

    from keras_adr import data, precision

    train_ds = data.load(
        "fashion_mnist", "train", batch_size=128, shuffle=True, take=FLAGS.train_examples
    )
    (x, y) = next(iter(data.load("fashion_mnist", "test", batch_size=FLAGS.examples)))
    x, y = x.numpy(), y.numpy().astype(np.int32)
    rows = []
    for defense in ("standard", "pgd_at"):
        backbone = _train(defense, train_ds)
        for policy in POLICIES:
            model = precision.with_policy(backbone, policy)
            for method, attack in (("naive", _naive_pgd), ("scaled", _scaled_pgd)):
                attack(model, x[:8], y[:8])  # Traces.
                started = time.perf_counter()
                x_adv, grad = attack(model, x, y)
                seconds = time.perf_counter() - started
                zero = np.all(np.reshape(np.asarray(grad), (len(x), -1)) == 0, axis=1)
                row = {
                    "defense": defense,
                    "policy": policy,
                    "gradient": method,
                    "clean_accuracy": _accuracy(model, x, y),
                    "pgd20_accuracy": _accuracy(model, np.asarray(x_adv), y),
                    "zero_gradient_fraction": float(zero.mean()),
                    "attack_seconds": round(seconds, 2),
                }
                print(row, flush=True)
                rows.append(row)
    header = ["defense", "policy", "gradient", "clean %", "PGD-20 %", "zero gradient %", "s"]
    table = results_io.markdown_table(
        header,
        [
            [
                r["defense"],
                r["policy"],
                r["gradient"],
                f"{100 * r['clean_accuracy']:.1f}",
                f"{100 * r['pgd20_accuracy']:.1f}",
                f"{100 * r['zero_gradient_fraction']:.1f}",
                f"{r['attack_seconds']:.1f}",
            ]
            for r in rows
        ],
    )
    print("\n".join(table))
    if FLAGS.output:
        results_io.write_results(
            FLAGS.output,
            {"rows": rows, "machine": results_io.machine_info(), "examples": len(x)},
            markdown="\n".join(
                [
                    f"# PGD-20 against low-precision copies of one model ({len(x)} test images)",
                    "",
                    "`python -m benchmarks.precision_attack` (see its docstring). Compare "
                    "accuracies, not times: `naive` is a Python loop inside `tf.function`, "
                    "`scaled` is `attacks.pgd`, float16 is emulated on CPUs, and other jobs "
                    "may have shared the machine.",
                    "",
                    *table,
                    "",
                ]
            ),
        )


if __name__ == "__main__":
    app.run(main)
