"""ResNet-18 adversarial-training speed on a GPU: adr_pgd versus pgd_at.

A prepared script for a GPU machine (nothing here is GPU-specific, but the
numbers only mean something there). It times Keras' compiled train step of
`keras_adr.ADRModel(models.resnet18())` on CIFAR-shaped random data
(32x32x3, 10 classes) for each defense, with `--attack_steps` PGD steps at
global batch `--batch_size`:

  * each model is built inside the chosen strategy's scope and warmed up
    with `model.fit` for `--warmup` steps (tracing, autotuning);
  * then the defenses take turns, one timed step each, `--steps` rounds, so
    that clock changes and noise hit them alike; every step is waited for
    (its loss is fetched) before the clock stops;
  * it prints, per defense, the median seconds per step, images per second
    and the ratio to `pgd_at`, and writes them to `--output` (JSON).

Usage (one GPU; about a minute or two on an H100):
    python -m benchmarks.gpu_resnet18 --output=benchmarks/results/gpu_resnet18.json

All local GPUs, synchronized BatchNorm, global pairwise terms:
    python -m benchmarks.gpu_resnet18 --strategy=mirrored --sync_batchnorm

Smoke test on a CPU (tiny, numbers meaningless):
    python -m benchmarks.gpu_resnet18 --allow_cpu --batch_size=8 --attack_steps=1 \
        --warmup=1 --steps=1 --image_size=16
"""

import json
import os
import sys
import time

from absl import app, flags

if not __package__:  # `python benchmarks/gpu_resnet18.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("image_size", 32, "Image height and width (CIFAR: 32).")
flags.DEFINE_integer("warmup", 5, "Untimed steps per defense (tracing, autotuning).")
flags.DEFINE_integer("steps", 30, "Timed steps per defense, taken in turns.")
flags.DEFINE_list("defenses", ["pgd_at", "adr_pgd"], "Presets to time (keras_adr.presets).")
flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored"], "default: one device; mirrored: all local GPUs."
)
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm (with --strategy=mirrored).")
flags.DEFINE_enum(
    "pairwise_scope",
    "global",
    ["global", "replica"],
    "ADR pairwise terms over the global batch or per replica.",
)
flags.DEFINE_bool("allow_cpu", False, "Run without a GPU (smoke test only).")
flags.DEFINE_string("output", None, "JSON file for the results.")


def _gpu_names(tf):
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return names


def _build(name, strategy, dataset):
    import keras
    import numpy as np

    import keras_adr
    from keras_adr import distribute, models, presets

    keras.utils.set_random_seed(0)
    config = presets.get(
        name,
        attack_steps=FLAGS.attack_steps,
        attack_epsilon=8 / 255,
        attack_step_size=2 / 255,
        pairwise_scope=FLAGS.pairwise_scope,
    )
    with strategy.scope():
        backbone = models.resnet18(
            input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
            num_classes=10,
            sync_batchnorm=FLAGS.sync_batchnorm,
        )
        model = keras_adr.ADRModel(backbone, config)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-4))
    distribute.patch_keras_fit(model)
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup, verbose=0)
    warmup_seconds = time.perf_counter() - started
    train_function = model.make_train_function()
    if FLAGS.strategy != "default":
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
    else:
        iterator = iter(dataset)
    float(np.mean(train_function(iterator)["loss"]))  # a retrace for this iterator, if any
    return train_function, iterator, warmup_seconds


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    gpus = _gpu_names(tf)
    if not gpus and not FLAGS.allow_cpu:
        raise SystemExit(
            "No GPU is visible to TensorFlow (tf.config.list_physical_devices"
            "('GPU') is empty); pass --allow_cpu for a smoke test."
        )
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    strategy = (
        tf.distribute.MirroredStrategy()
        if FLAGS.strategy == "mirrored"
        else tf.distribute.get_strategy()
    )

    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
    x = rng.uniform(size=shape).astype(np.float32)
    y = rng.integers(0, 10, FLAGS.batch_size).astype(np.int32)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)

    runs, warmup = {}, {}
    for name in FLAGS.defenses:
        function, iterator, warmup[name] = _build(name, strategy, dataset)
        runs[name] = (function, iterator)
        print(f"{name}: built and warmed up in {warmup[name]:.1f}s", flush=True)

    for function, iterator in runs.values():  # one untimed round once all are built
        float(np.mean(function(iterator)["loss"]))
    seconds = {name: [] for name in FLAGS.defenses}
    for step in range(FLAGS.steps):
        shift = step % len(FLAGS.defenses)
        for name in FLAGS.defenses[shift:] + FLAGS.defenses[:shift]:
            function, iterator = runs[name]
            started = time.perf_counter()
            float(np.mean(function(iterator)["loss"]))  # waits for the step to finish
            seconds[name].append(time.perf_counter() - started)

    median = {name: float(np.median(values)) for name, values in seconds.items()}
    baseline = median.get("pgd_at")
    results = {
        "machine": results_io.machine_info(gpus=gpus),
        "model": "resnet18",
        "image_shape": list(shape[1:]),
        "batch_size": FLAGS.batch_size,
        "attack_steps": FLAGS.attack_steps,
        "strategy": FLAGS.strategy,
        "num_replicas": strategy.num_replicas_in_sync,
        "sync_batchnorm": FLAGS.sync_batchnorm,
        "pairwise_scope": FLAGS.pairwise_scope,
        "timed_steps": FLAGS.steps,
        "warmup_seconds": warmup,
        "step_seconds_median": median,
        "step_seconds_min": {name: float(np.min(v)) for name, v in seconds.items()},
        "images_per_second": {name: FLAGS.batch_size / v for name, v in median.items()},
        "ratio_to_pgd_at": (
            {name: v / baseline for name, v in median.items()} if baseline else None
        ),
    }
    for name in FLAGS.defenses:
        ratio = f", {median[name] / baseline:.2f}x pgd_at" if baseline else ""
        print(
            f"{name:>10}: {median[name] * 1000:8.1f} ms/step, "
            f"{results['images_per_second'][name]:8.1f} images/s{ratio}"
        )
    print(json.dumps(results, indent=2))
    if FLAGS.output:
        results_io.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
