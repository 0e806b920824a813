"""The committed reference model in saved_models/ loads and matches its metadata."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import data, export

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = os.path.join(_ROOT, "saved_models", "fashion_mnist_adr")
# TF Serving serves the highest version.
_MODEL = os.path.join(_BASE, str(max(export.list_versions(_BASE))))


def test_models_config_points_at_the_reference_model():
    with open(os.path.join(_ROOT, "saved_models", "models.config")) as f:
        text = f.read()
    assert 'name: "fashion_mnist_adr"' in text
    assert 'base_path: "/models/fashion_mnist_adr"' in text


def test_reference_model_reproduces_recorded_accuracy():
    try:
        test_data = data.load("fashion_mnist", "test", batch_size=250, take=1000)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    metadata = export.read_metadata(_MODEL)
    assert "adr-train" in metadata["command"]
    assert metadata["dataset"] == "fashion_mnist"
    recorded = metadata["reference_check"]["clean_accuracy_first_1000_test"]
    robustness = metadata["robustness"]
    assert robustness["num_examples"] == 10000
    assert robustness["robust_accuracy"] <= min(robustness["attack_accuracy"].values())

    serve = tf.saved_model.load(_MODEL).signatures["serving_default"]
    correct = total = 0
    for images, labels in test_data:
        correct += int(np.sum(serve(images=images)["classes"].numpy() == labels.numpy()))
        total += len(labels)
    assert total == 1000
    assert abs(correct / total - recorded) <= 0.005
