"""Choosing a `tf.distribute` strategy: TensorFlow's own engines only.

Build the model and optimizer inside `strategy.scope()`, and batch the input
with the *global* batch size: Keras splits each batch across replicas. The
ADR step divides every loss by the global batch size and, with
`pairwise_scope="global"`, gathers the pairwise terms' references across
replicas (see `keras_adr.training`).
"""

import json
import os

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


def split_cpu(num_devices):
    """Splits the first physical CPU into `num_devices` logical devices.

    For testing multi-replica code on a CPU-only machine; must run before
    TensorFlow initialises its devices.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
