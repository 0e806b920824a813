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
            '"task": {"type": "worker", "index": 0}}.')
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
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


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
    is in progress, so a restarted worker resumes from its own backup.
    """
    if is_chief(strategy):
        return output_dir
    return os.path.join(output_dir, f"workertemp_{worker_index(strategy)}")


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
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
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
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(int(num_devices))])
    except RuntimeError as error:
        raise ValueError(
            f"Cannot split the CPU into {num_devices} logical devices: TensorFlow is "
            f"already initialised ({error}). Call split_cpu before any TensorFlow op.") from None
