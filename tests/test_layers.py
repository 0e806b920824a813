"""keras_adr.layers: PixelRange (check_pixels), Latent, Standardize.

Each layer eagerly and in tf.function, in a .keras file and in a SavedModel,
under a 2-replica MirroredStrategy (a subprocess), and its error messages.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import blob_data

import keras_adr
from keras_adr import layers, presets

_SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
_MEAN, _STD = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]


def _model(clip_min=-1.0, clip_max=1.0):
    """PixelRange -> Standardize -> conv -> Latent -> logits, on 4x4x3 images."""
    inputs = keras.Input((4, 4, 3))
    x = layers.PixelRange(clip_min, clip_max, name="pixels")(inputs)
    x = layers.Standardize(mean=_MEAN, std=_STD, name="standardize")(x)
    x = keras.layers.Conv2D(2, 2, activation="relu")(x)
    z = layers.Latent(name="codes")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(3)(z))


def _images(n=5, low=-1.0, high=1.0, seed=0):
    return np.random.default_rng(seed).uniform(low, high, (n, 4, 4, 3)).astype(np.float32)


def _expected_standardized(x):
    return (x - np.asarray(_MEAN)) / np.asarray(_STD)


def _intermediate(model, name, x):
    return np.asarray(keras.Model(model.input, model.get_layer(name).output)(x))


# --- PixelRange / check_pixels ----------------------------------------------


def test_pixel_range_passes_valid_images_unchanged():
    x = _images(low=0.0, high=1.0)
    x[0, 0, 0] = [0.0, 1.0, 0.5]  # The bounds themselves are valid.
    np.testing.assert_array_equal(layers.PixelRange()(x), x)
    np.testing.assert_array_equal(tf.function(layers.PixelRange())(x), x)
    assert layers.check_pixels(x) is x  # Eagerly: the input itself.
    assert layers.PixelRange()(x[:0]).shape == (0, 4, 4, 3)
    assert tf.function(layers.check_pixels)(tf.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("call", ["eager", "tf.function"])
def test_pixel_range_errors_say_what_was_received(call):
    layer = layers.PixelRange(0.0, 1.0, name="pixels")
    run = layer if call == "eager" else tf.function(layer)
    error = ValueError if call == "eager" else tf.errors.InvalidArgumentError
    x = _images(low=0.0, high=1.0)
    x[1, 2, 3, 0], x[2, 0, 0, 1] = -0.25, 3.5
    with pytest.raises(error, match=r"`pixels` must lie in \[clip_min, clip_max\] = \[0, 1\]") as e:
        run(x)
    # The received span: "[-0.25, 3.5]" eagerly, Assert's data "[-0.25] [3.5]" in a graph.
    assert "-0.25" in str(e.value) and "3.5" in str(e.value) and "uint8" in str(e.value)
    x[3, 1, 1, 2] = np.nan  # Reported as such, not as out of range.
    with pytest.raises(error, match="`pixels`.*non-finite"):
        run(x)
    if call == "eager":  # One line (Keras adds the call's arguments), with the count.
        with pytest.raises(ValueError, match="received 1 non-finite values") as e:
            layers.check_pixels(x, name="pixels")
        assert "\n" not in str(e.value)


def test_check_pixels_messages_and_arguments():
    with pytest.raises(ValueError, match="`x` must be floating-point.*received dtype uint8"):
        layers.check_pixels(np.zeros((2, 2), np.uint8), name="x")
    with pytest.raises(ValueError, match="dtype int32"):
        layers.PixelRange()(tf.zeros((1, 2), tf.int32))
    with pytest.raises(ValueError, match=r"Divide by 255\.$"):
        layers.check_pixels(np.full((1, 2), 2.0), hint="Divide by 255.")
    np.testing.assert_array_equal(layers.check_pixels([[-3.0, 2.0]], -3, 2), [[-3.0, 2.0]])
    for kwargs, match in [
        (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
        (dict(clip_min=0.0, clip_max=np.inf), "`clip_max` must be a finite number"),
        (dict(clip_min="0"), "`clip_min` must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            layers.PixelRange(**kwargs)
        with pytest.raises(ValueError, match=match):
            layers.check_pixels(np.zeros(2), **kwargs)


def test_pixel_range_in_fit_and_predict_fails_at_run_time():
    model = _model(0.0, 1.0)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\].*Received min and max"):
        model.predict(_images(low=0.0, high=2.0), verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        model.fit(np.full((2, 4, 4, 3), np.nan, np.float32), np.zeros(2), verbose=0)


# --- Round trips ------------------------------------------------------------


def _check_round_trip(model, restored):
    """`restored` computes what `model` does, layer by layer, and keeps the pixel check."""
    x = _images()
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _intermediate(model, "standardize", x), _expected_standardized(x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=r"\[-1, 1\]"):
        restored(x + 1.5)


def test_layers_round_trip_through_keras_files(tmp_path):
    model = _model()
    path = tmp_path / "layers.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    _check_round_trip(model, restored)
    assert type(restored.get_layer("pixels")) is layers.PixelRange
    assert type(restored.get_layer("codes")) is layers.Latent
    assert restored.get_layer("pixels").get_config()["clip_min"] == -1.0
    np.testing.assert_allclose(restored.get_layer("standardize").std.numpy(), _STD)
    # Also through the registered name alone.
    config = keras.saving.serialize_keras_object(layers.PixelRange(0.5, 2.0))
    assert config["registered_name"] == "keras_adr>PixelRange"
    clone = keras.saving.deserialize_keras_object(config)
    assert (clone.clip_min, clone.clip_max) == (0.5, 2.0)


def test_layers_round_trip_through_saved_models(tmp_path):
    model = _model()
    model.export(str(tmp_path / "exported"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    _check_round_trip(model, lambda images: exported.serve(tf.constant(images)))
    tf.saved_model.save(model, str(tmp_path / "saved"))
    signature = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]

    def serving_default(images):
        (logits,) = signature(**{name: tf.constant(images)}).values()
        return logits

    _check_round_trip(model, serving_default)


def test_latent_and_standardize_inside_tf_function():
    model = _model()
    x = _images()
    codes = keras.Model(model.input, model.get_layer("codes").output)
    before_latent = keras.Model(model.input, model.get_layer("codes").input)
    np.testing.assert_array_equal(tf.function(codes)(x), before_latent(x))
    np.testing.assert_allclose(
        tf.function(model.get_layer("standardize"))(x),
        _expected_standardized(x),
        rtol=1e-5,
        atol=1e-6,
    )


# --- ADRModel finds Latent by type ------------------------------------------


def test_adr_model_trains_a_backbone_with_latent_and_no_layer_named_latent():
    keras.utils.set_random_seed(3)
    x, y = blob_data(32)
    inputs = keras.Input((8, 8, 1))
    h = layers.PixelRange()(inputs)
    h = keras.layers.Conv2D(2, 3, activation="relu")(h)
    z = layers.Latent(name="features")(keras.layers.Flatten()(h))
    backbone = keras.Model(inputs, keras.layers.Dense(3)(z))
    assert "latent" not in [layer.name for layer in backbone.layers]
    model = keras_adr.ADRModel(backbone, presets.get("adr_pgd", attack_steps=1))
    assert model.latent_layer == "features"
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [w.copy() for w in backbone.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["local_compactness"][0] > 0  # z came from the Latent layer.
    assert any(not np.array_equal(a, b) for a, b in zip(before, backbone.get_weights()))


# --- Standardize errors -----------------------------------------------------


def test_standardize_errors():
    with pytest.raises(ValueError, match="2 statistics for 3 channels"):
        layers.Standardize(mean=[0.1, 0.2])(np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="built layer"):
        layers.Standardize().adapt(np.zeros((1, 2, 2, 3), np.float32))
    layer = layers.Standardize()
    layer.build((None, 2, 2, 3))
    with pytest.raises(ValueError, match="no images"):
        layer.adapt(tf.data.Dataset.from_tensor_slices(np.zeros((0, 2, 2, 3), np.float32)))


# --- MirroredStrategy -------------------------------------------------------


@pytest.mark.slow
def test_layers_and_callbacks_under_two_replicas(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    result = subprocess.run(
        [sys.executable, os.path.join(_SCRIPTS, "layers_mirrored.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_replicas"] == 2
    history = out["history"]
    # fit with augmented data; the callbacks wrote into the history.
    assert np.isfinite(history["loss"]).all() and not out["diverged"]
    assert history["val_robust_accuracy"] == [out["robust_accuracy"]]
    assert out["robust_examples"] == 32 and history["epoch_seconds"][0] > 0
    # Per replica, each layer computes what one device computes.
    assert out["logits_difference"] < 1e-6 and out["latent_difference"] < 1e-6
    assert out["standardize_difference"] < 1e-5
    # A bad pixel in the second replica's half fails with the layer's message.
    assert "`pixels` must lie in [clip_min, clip_max] = [0, 1]" in out["pixel_error"]
    assert "[1.5]" in out["pixel_error"]


_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_standardize_is_a_keras_normalization_and_loads_models_saved_before():
    layer = layers.Standardize(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    assert isinstance(layer, keras.layers.Normalization)
    images = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    expected = (images - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
    np.testing.assert_allclose(np.asarray(layer(images)), expected, rtol=1e-6, atol=1e-6)
    # Written by the Standardize of before (a plain Layer with weights mean
    # and std, set to these statistics) with Keras 3.10, the oldest supported:
    # its weights load into the new one.
    old = keras.saving.load_model(os.path.join(_DATA, "standardize_before_normalization.keras"))
    standardize = old.get_layer("standardize")
    assert isinstance(standardize, layers.Standardize)
    np.testing.assert_allclose(np.asarray(standardize(images)), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(standardize.std.numpy(), [0.5, 0.25, 2.0], rtol=1e-6)


def test_standardize_reads_its_weights_at_every_call(tmp_path):
    # Checkpoint restores (set_weights, load_weights) must take effect at once.
    model = keras.Sequential([keras.Input((2, 2, 1)), layers.Standardize(name="standardize")])
    call = tf.function(lambda x: model(x))
    x = np.full((1, 2, 2, 1), 3.0, np.float32)
    np.testing.assert_allclose(np.asarray(call(x)), 3.0)
    mean, variance, count = model.get_layer("standardize").get_weights()
    model.set_weights([mean + 1.0, variance * 4.0, count])
    np.testing.assert_allclose(np.asarray(call(x)), 1.0)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(restored(x)), 1.0)
    assert restored.get_layer("standardize").get_config()["std"] == [2.0]
