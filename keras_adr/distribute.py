"""Choosing a `tf.distribute` strategy: TensorFlow's own engines only.

Build the model and optimizer inside `strategy.scope()`, and batch the input
with the *global* batch size: Keras splits each batch across replicas. The
ADR step divides every loss by the global batch size and, with
`pairwise_scope="global"`, gathers the pairwise terms' references across
replicas (see `keras_adr.training`).
"""

import json
import os
import shutil

import tensorflow as tf

from keras_adr import _keras_compat

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def get_strategy(name="auto"):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
        name: `"auto"`: `MirroredStrategy` over all visible GPUs when there
            are more than one, else the default strategy; `"default"`: no
            distribution; `"mirrored"`: `MirroredStrategy` over all local
            GPUs, or all logical CPU devices when there is no GPU;
            `"multi_worker"`: `MultiWorkerMirroredStrategy` configured from the
            `TF_CONFIG` environment variable.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: For an unknown name, or `"multi_worker"` without a valid
            `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    _check_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "strategy='multi_worker' needs the TF_CONFIG environment variable, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}.'
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        index = config["task"]["index"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG is not valid ({error}): {raw!r}.") from None
    if not 0 <= int(index) < len(workers):
        raise ValueError(f"TF_CONFIG task index {index} is outside the {len(workers)} workers.")


def is_chief(strategy):
    """True on the worker that should write outputs (checkpoints, exports)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# The range of Keras versions the tests cover (the private method that
# `patch_keras_fit` replaces is fenced by it); kept here under its old name.
KERAS_PATCH_RANGE = _keras_compat.KERAS_RANGE
UnsupportedKerasError = _keras_compat.UnsupportedKerasError
check_keras_version = _keras_compat.check_keras_version


def patch_keras_fit(model):
    """Fixes Keras 3 `fit` of a model built inside a `tf.distribute` strategy scope.

    Keras' TensorFlow trainer (3.10 to 3.15), before the first step, builds the model
    symbolically from one batch that it *reads from the dataset* (the method
    that `keras_adr._keras_compat.replace_symbolic_build` replaces), whether or
    not the model is already built (`tests/test_distribute.py` checks that building it before
    `fit` does not help). That has two consequences:

    - The read opens one extra iterator, which consumes one shuffle order of
      a `shuffle(..., reshuffle_each_iteration=True)` dataset: a distributed
      run would not train on the batches of a one-device run. Only shapes
      matter there, so the dataset's `element_spec` is used instead, and a
      distributed run sees exactly the batches of a one-device run with the
      same seed.
    - Under `MultiWorkerMirroredStrategy` the read batch is reduced with
      `strategy.reduce("MEAN", (x, y), axis=None)`, which fails for a nested
      structure ("Attempt to convert a value (PerReplica...) to a Tensor";
      https://github.com/keras-team/keras/issues/20585,
      https://github.com/tensorflow/tensorflow/issues/72388). Using the
      `element_spec` avoids that too.

    Replacing that private method is fenced: outside `KERAS_PATCH_RANGE` the
    patch refuses to run rather than break in a Keras without it.

    Under `MultiWorkerMirroredStrategy` Keras also reduces each step's logs
    with `strategy.reduce("MEAN", v, axis=0)`, which fails for scalars
    ("Invalid reduction dimension 0"): the train and test steps' scalar outputs
    are returned with shape `[1]` instead, so that the reduction averages them
    over the replicas of all workers, as `MirroredStrategy` does. (The epoch
    logs that callbacks and the history see are read from the metrics
    themselves, summed over all replicas: exact.)

    Everything is patched on this model instance only. A no-op for a model
    built outside any strategy scope. Call it outside `strategy.scope()`.

    Returns:
        `model`.

    Raises:
        UnsupportedKerasError: For a distributed model and a Keras version
            outside `KERAS_PATCH_RANGE`.
        ValueError: If called inside a strategy scope.
    """
    if tf.distribute.has_strategy():
        raise ValueError("Call patch_keras_fit(model) outside `strategy.scope()`.")
    strategy = model.distribute_strategy
    if strategy is tf.distribute.get_strategy():
        return model  # Built outside any scope: Keras reads no batch before `fit`.
    check_keras_version()

    def maybe_symbolic_build(original, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            dataset = getattr(getattr(iterator, "data_adapter", None), "get_tf_dataset", None)
            if dataset is None:
                return original(iterator=iterator)
            data_batch = dataset().element_spec  # Shapes and dtypes: reads no data.
        return original(data_batch=data_batch)

    _keras_compat.replace_symbolic_build(model, maybe_symbolic_build)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        num_workers(strategy) > 1
    ):

        def vector_logs(step):
            def wrapped(data):
                return tf.nest.map_structure(
                    lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v,
                    step(data),
                )

            return wrapped

        model.train_step = vector_logs(model.train_step)
        model.test_step = vector_logs(model.test_step)
    return model


def worker_index(strategy):
    """This worker's index in the cluster (0 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    return int(resolver.task_id or 0)


def num_workers(strategy):
    """Number of worker processes that train together (1 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def work_dir(strategy, output_dir):
    """Where this worker writes: `output_dir` on the chief, a private directory elsewhere.

    The Keras multi-worker convention: every worker runs the same callbacks
    and saves (a save may need collectives, so all workers must take part),
    but only the chief writes the real outputs; each other worker writes into
    `<output_dir>/workertemp_<index>`, which it deletes when the run ends (see
    `remove_work_dir`). Its `BackupAndRestore` state lives there while the run
    is in progress. A restarted run restores every worker from the chief's
    backup and selects the chief's `best.keras`, so that a worker lost before
    writing its own resumes like the others.
    """
    if is_chief(strategy):
        return output_dir
    return os.path.join(output_dir, f"workertemp_{worker_index(strategy)}")


def barrier(strategy):
    """Returns once every worker has called it: an all-reduce of one number.

    A no-op without a cluster. After it, each worker sees what the others
    wrote before calling it (such as the chief's `best.keras`).
    """
    if num_workers(strategy) > 1:
        strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None
        )


def remove_work_dir(strategy, output_dir):
    """Deletes a non-chief worker's private directory (no-op on the chief)."""
    path = work_dir(strategy, output_dir)
    if path != output_dir:
        shutil.rmtree(path, ignore_errors=True)


def shard_by_data(dataset):
    """Sets `AutoShardPolicy.DATA`: multi-worker input sharded by example.

    Our datasets come from in-memory tensors, not files, so the default
    `AUTO` policy would try file sharding first and fall back with a warning.
    With `DATA`, every worker builds the same (identically seeded) pipeline of
    *global* batches, and `tf.distribute` gives each replica its own slice of
    every batch: the global batch size stays `batch_size`.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def split_cpu(num_devices):
    """Splits the first physical CPU into `num_devices` logical devices.

    A testing aid: it lets `MirroredStrategy` run several replicas on a
    CPU-only machine (`adr-train --strategy=mirrored --cpu_replicas=2`). It
    must run before TensorFlow initialises its devices, i.e. before the first
    TensorFlow op of the process. The replicas share the same cores, so this
    checks correctness, not speed.

    Raises:
        ValueError: If `num_devices` < 1, or TensorFlow is already initialised.
    """
    if int(num_devices) < 1:
        raise ValueError(f"`num_devices` must be >= 1; got {num_devices}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(num_devices))]
        )
    except RuntimeError as error:
        raise ValueError(
            f"Cannot split the CPU into {num_devices} logical devices: TensorFlow is "
            f"already initialised ({error}). Call split_cpu before any TensorFlow op."
        ) from None
