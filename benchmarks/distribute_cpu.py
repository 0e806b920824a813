"""ADR training-step time on one CPU device versus 2 logical CPU replicas.

Each configuration runs in its own subprocess (the CPU must be split into
logical devices before TensorFlow starts):

  * `default`:     no distribution, one device;
  * `mirrored_1`:  `MirroredStrategy` over 1 device (the strategy's overhead);
  * `mirrored_2`:  `MirroredStrategy` over 2 logical CPU devices
                   (`distribute.split_cpu(2)`), global batch split in two,
                   pairwise terms gathered across replicas
                   (`pairwise_scope="global"`).

The model is `small_cnn` on Fashion-MNIST-shaped random data, `adr_pgd` with
`--attack_steps` PGD steps, global batch `--batch_size`, trained with
`model.fit` (as `adr-train` does) for `--warmup` steps (tracing), then
Keras' own compiled train function on the (distributed) dataset. To make
machine noise hit every configuration alike, the subprocesses stay alive
and take turns: one timed step each, in rotating order, `--steps` rounds;
the result is each configuration's median step time.

Logical CPU devices share the same cores, so 2 replicas are not expected to
be faster than one device: this measures the cost of the distributed code
path, not a speed-up. See `benchmarks/gpu_resnet18.py` for GPUs.

Usage:
    nice -n 10 python -m benchmarks.distribute_cpu \
        --output=benchmarks/results/distribute_cpu.json
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

if not __package__:  # `python benchmarks/distribute_cpu.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import results_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (tracing, warm-up) in each subprocess.")
flags.DEFINE_integer("steps", 15, "Timed steps per configuration, taken in turns.")
flags.DEFINE_list("configs", ["default", "mirrored_1", "mirrored_2"], "Configurations.")
flags.DEFINE_string("output", None, "JSON file for the results.")
flags.DEFINE_string("child", None, "Internal: serve timed steps of one configuration.")

_REPLICAS = {"default": 1, "mirrored_1": 1, "mirrored_2": 2}


def _child(config):
    from keras_adr import distribute

    if _REPLICAS[config] > 1:
        distribute.split_cpu(_REPLICAS[config])

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_adr
    from keras_adr import models, presets

    if config == "default":
        strategy = tf.distribute.get_strategy()
    else:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    assert strategy.num_replicas_in_sync == _REPLICAS[config], strategy.num_replicas_in_sync

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(FLAGS.batch_size, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, FLAGS.batch_size).astype(np.int32)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras_adr.ADRModel(
            models.small_cnn(), presets.get("adr_pgd", attack_steps=FLAGS.attack_steps)
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    distribute.patch_keras_fit(model)

    # Warm-up with fit: builds the optimizer and traces Keras' train function.
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup, verbose=0)
    train_function = model.make_train_function()
    if config == "default":
        iterator = iter(dataset)
    else:
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
    float(train_function(iterator)["loss"])
    print("ready", flush=True)
    for line in sys.stdin:  # one timed step per request
        if line.strip() != "step":
            break
        start = time.perf_counter()
        float(train_function(iterator)["loss"])  # waits for the step to finish
        print(time.perf_counter() - start, flush=True)


def _start_child(config):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={config}",
        f"--batch_size={FLAGS.batch_size}",
        f"--attack_steps={FLAGS.attack_steps}",
        f"--warmup={FLAGS.warmup}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    child = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in child.stdout:
        if line.strip() == "ready":
            return child
    raise RuntimeError(
        f"{config} failed to start (exit code {child.wait()}); run "
        f"`{' '.join(command)}` to see why."
    )


def main(argv):
    del argv
    if FLAGS.child:
        _child(FLAGS.child)
        return
    import numpy as np

    seconds = {config: [] for config in FLAGS.configs}
    load_before = os.getloadavg()
    children = {}
    try:
        for config in FLAGS.configs:
            children[config] = _start_child(config)
        for step in range(FLAGS.steps):
            shift = step % len(FLAGS.configs)
            for config in FLAGS.configs[shift:] + FLAGS.configs[:shift]:
                children[config].stdin.write("step\n")
                children[config].stdin.flush()
                seconds[config].append(float(children[config].stdout.readline()))
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    load_after = os.getloadavg()
    median = {config: float(np.median(values)) for config, values in seconds.items()}
    baseline = median.get("default")
    results = {
        "machine": results_io.machine_info(load_average_1min=[load_before[0], load_after[0]]),
        "model": "small_cnn",
        "defense": "adr_pgd",
        "pairwise_scope": "global",
        "batch_size": FLAGS.batch_size,
        "attack_steps": FLAGS.attack_steps,
        "timed_steps": {config: len(values) for config, values in seconds.items()},
        "replicas": {config: _REPLICAS[config] for config in FLAGS.configs},
        "step_seconds_median": median,
        "step_seconds_min": {config: float(np.min(v)) for config, v in seconds.items()},
        "images_per_second": {config: FLAGS.batch_size / v for config, v in median.items()},
        "ratio_to_default": (
            {config: v / baseline for config, v in median.items()} if baseline else None
        ),
    }
    print(json.dumps(results, indent=2))
    if FLAGS.output:
        results_io.write_results(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
