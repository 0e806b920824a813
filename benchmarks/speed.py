"""Training-step and loss-term speed of keras-adr on this machine.

Measures, in one process with alternating runs (so machine noise hits every
variant alike):
  * seconds per compiled `train_step` for each defense on `small_cnn`
    (batch 128, `--attack_steps` PGD steps), and the ratio to `pgd_at`;
  * forward + backward time of the global compactness term, exact sorted form
    versus the naive `[B, B, k]` tensor.

Usage:
    python benchmarks/speed.py --repeats=10 --output=benchmarks/results/speed_cpu.json
"""

import json
import os
import platform
import time

from absl import app, flags
import numpy as np
import tensorflow as tf

import keras
import keras_adr
from keras_adr import losses, presets

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("repeats", 10, "Timed rounds (each runs every variant once).")
flags.DEFINE_list("defenses", ["pgd_at", "adr_pgd", "trades", "adr_trades"], "Defenses to time.")
flags.DEFINE_string("output", None, "JSON file for the results.")


def _train_functions(batch_size, attack_steps, defenses):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch_size, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    functions = {}
    for name in defenses:
        keras.utils.set_random_seed(0)
        model = keras_adr.ADRModel(keras_adr.models.small_cnn(),
                                   presets.get(name, attack_steps=attack_steps))
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        model.make_train_function()
        iterator = iter(batches)
        for _ in range(2):  # trace and warm up
            model.train_function(iterator)
        functions[name] = (model.train_function, iterator)
    return functions


def _global_compactness_functions(batch_size, features=1024, classes=10):
    rng = np.random.default_rng(1)
    y = tf.constant(rng.integers(0, classes, batch_size).astype(np.int32))
    z = tf.constant(np.maximum(rng.normal(size=(batch_size, features)), 0).astype(np.float32))
    z_adv = tf.constant(np.maximum(rng.normal(size=(batch_size, features)), 0).astype(np.float32))
    functions = {}
    for method in ("sorted", "naive"):
        @tf.function
        def step(z_adv, method=method):
            with tf.GradientTape() as tape:
                tape.watch(z_adv)
                value = losses.global_compactness(y, z, z_adv, method=method)
            return value, tape.gradient(value, z_adv)

        step(z_adv)
        functions[method] = (step, z_adv)
    return functions


def _alternate(functions, repeats, call):
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            call(fn)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv):
    del argv
    steps = _alternate(_train_functions(FLAGS.batch_size, FLAGS.attack_steps, FLAGS.defenses),
                       FLAGS.repeats, lambda fn: fn[0](fn[1]))
    terms = _alternate(_global_compactness_functions(FLAGS.batch_size), FLAGS.repeats * 3,
                       lambda fn: [t.numpy() for t in fn[0](fn[1])])
    baseline = steps.get("pgd_at")
    results = {
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                    "keras": keras.__version__},
        "batch_size": FLAGS.batch_size,
        "attack_steps": FLAGS.attack_steps,
        "train_step_seconds": steps,
        "images_per_second": {k: FLAGS.batch_size / v for k, v in steps.items()},
        "ratio_to_pgd_at": {k: v / baseline for k, v in steps.items()} if baseline else None,
        "global_compactness_fwd_bwd_ms": {k: 1000 * v for k, v in terms.items()},
    }
    print(json.dumps(results, indent=2))
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
