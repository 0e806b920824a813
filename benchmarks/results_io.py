"""Shared by the benchmark scripts: result files and thread settings."""

import json
import os


def write_json(results, path):
    """Writes `results` to `path` (indented JSON), creating the directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)


def write_json_atomic(path, payload):
    """Writes a complete file or leaves the old one (a row must never be half written)."""
    from keras_adr import fileio

    fileio.write_json(path, payload)


def read_json(path):
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def set_threads(threads):
    """TensorFlow intra- and inter-op threads (0 = TensorFlow's choice).

    For these small models two processes of one thread each get more from
    two cores than one process of two threads.
    """
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
