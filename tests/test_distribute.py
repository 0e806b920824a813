"""tf.distribute: 2 logical CPU replicas give exactly the single-device step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_adr import distribute

_SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _run_step(scope):
    result = subprocess.run([sys.executable, os.path.join(_SCRIPTS, "mirrored_step.py"), scope],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _max_difference(a, b):
    return max(float(np.abs(np.array(x) - np.array(y)).max()) for x, y in zip(a, b))


def test_two_replicas_equal_one_device_with_global_pairwise_scope():
    out = _run_step("global")
    single_weights, single_metrics = out["single"]
    mirrored_weights, mirrored_metrics = out["mirrored"]
    assert _max_difference(out["initial"], single_weights) > 1e-3  # the step did something
    assert _max_difference(single_weights, mirrored_weights) < 1e-5
    assert set(single_metrics) == set(mirrored_metrics)
    for name, value in single_metrics.items():
        np.testing.assert_allclose(mirrored_metrics[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_replica_pairwise_scope_differs():
    # Per-replica pairwise terms see half the batch: a different (cheaper) objective.
    out = _run_step("replica")
    assert _max_difference(out["single"][0], out["mirrored"][0]) > 1e-6


def test_get_strategy_errors(monkeypatch):
    with pytest.raises(ValueError, match="valid strategies"):
        distribute.get_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="outside"):
        distribute.get_strategy("multi_worker")


def test_default_strategies():
    assert distribute.get_strategy("default").num_replicas_in_sync == 1
    assert distribute.get_strategy("auto").num_replicas_in_sync == 1  # no GPUs here
