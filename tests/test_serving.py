"""Tests for keras_adr.serving.

Requests are checked against the signatures of a real exported SavedModel,
and then run through it the way TF Serving would decode them, so that
names, dtypes and shapes are never only compared with the same constants
the code uses.
"""

import ast
import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adr import export, serving

_INPUT_SHAPE = (28, 28, 1)


def _tiny_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input(_INPUT_SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def signatures(model, tmp_path_factory):
    path = export.export_saved_model(model, tmp_path_factory.mktemp("serving") / "model")
    loaded = tf.saved_model.load(path)
    # Keep `loaded` alive: the signatures reference its variables.
    return loaded, loaded.signatures


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(3, *_INPUT_SHAPE), dtype=np.uint8)


def _input_spec(signature):
    args, kwargs = signature.structured_input_signature
    assert args == () and len(kwargs) == 1
    return next(iter(kwargs.items()))


def _images_for(signature_name, pixels):
    if signature_name == export.SERVE_UINT8:
        return pixels
    return pixels.astype(np.float32) / 255.0


def _expected_classes_and_probabilities(model, pixels):
    logits = model(pixels.astype(np.float32) / 255.0, training=False)
    return np.argmax(logits, -1), keras.ops.softmax(logits).numpy()


def _serve_rest(signature, body):
    """Decodes a REST body as TF Serving would, runs it, encodes the reply."""
    body = json.loads(json.dumps(body))  # Only JSON reaches the server.
    input_name, spec = _input_spec(signature)
    if "instances" in body:
        rows = body["instances"]
        assert all(set(row) == {input_name} for row in rows)
        values = [row[input_name] for row in rows]
    else:
        assert set(body["inputs"]) == {input_name}
        values = body["inputs"][input_name]
    array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
    assert spec.shape.is_compatible_with(array.shape)
    outputs = signature(**{input_name: tf.constant(array)})
    outputs = {key: value.numpy().tolist() for key, value in outputs.items()}
    if "instances" in body:
        batch = len(values)
        predictions = [{key: value[i] for key, value in outputs.items()} for i in range(batch)]
        return json.dumps({"predictions": predictions})
    return json.dumps({"outputs": outputs})


@pytest.mark.parametrize("signature_name", export.SIGNATURE_NAMES)
@pytest.mark.parametrize("format", ["instances", "inputs"])
def test_rest_round_trip_through_saved_model(model, signatures, pixels, signature_name, format):
    _, sigs = signatures
    signature = sigs[signature_name]
    body = serving.rest_predict_body(
        _images_for(signature_name, pixels),
        signature_name=signature_name,
        format=format,
    )
    assert body["signature_name"] == signature_name
    assert signature_name in sigs

    classes, probabilities = serving.parse_rest_response(_serve_rest(signature, body))
    expected_classes, expected_probabilities = _expected_classes_and_probabilities(model, pixels)
    assert classes.dtype == np.int64 and probabilities.dtype == np.float32
    np.testing.assert_array_equal(classes, expected_classes)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)


def test_rest_body_uses_names_and_dtypes_given(signatures, pixels):
    _, sigs = signatures
    input_name, spec = _input_spec(sigs[export.SERVE_UINT8])
    body = serving.rest_predict_body(
        pixels,
        signature_name="custom",
        format="inputs",
        input_name=input_name,
        input_dtype=spec.dtype.name,
    )
    assert body == {
        "signature_name": "custom",
        "inputs": {input_name: pixels.tolist()},
    }
    # Plain Python ints, so that `json` can encode the body.
    assert type(body["inputs"][input_name][0][0][0][0]) is int


def test_rest_body_scales_uint8_for_float_signature(model, signatures, pixels):
    _, sigs = signatures
    body = serving.rest_predict_body(pixels, format="inputs")
    values = np.asarray(body["inputs"]["images"])
    np.testing.assert_allclose(values, pixels / 255.0, atol=1e-7)
    classes, _ = serving.parse_rest_response(_serve_rest(sigs[export.SERVING_DEFAULT], body))
    expected, _ = _expected_classes_and_probabilities(model, pixels)
    np.testing.assert_array_equal(classes, expected)


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (np.zeros((28, 28, 1), np.float32), {}, "rank 4"),
        (np.full((1, 28, 28, 1), np.nan, np.float32), {}, "finite"),
        (np.full((1, 28, 28, 1), 255.0, np.float32), {}, r"\[0, 1\]"),
        (np.zeros((1, 28, 28, 1), np.int32), {}, "dtype"),
        (
            np.zeros((1, 28, 28, 1), np.float32),
            {"signature_name": export.SERVE_UINT8},
            "uint8",
        ),
        (np.zeros((1, 28, 28, 1), np.float32), {"format": "rows"}, "format"),
    ],
)
def test_rest_body_rejects_bad_images(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        serving.rest_predict_body(images, **kwargs)


def test_rest_predict_url():
    assert (
        serving.rest_predict_url(model_name="fmnist")
        == "http://localhost:8501/v1/models/fmnist:predict"
    )
    assert (
        serving.rest_predict_url(model_name="fmnist", host="10.0.0.2", port=9000, version=3)
        == "http://10.0.0.2:9000/v1/models/fmnist/versions/3:predict"
    )
    assert serving.rest_predict_url(model_name="m", host="::1").startswith("http://[::1]:8501/")
    with pytest.raises(ValueError):
        serving.rest_predict_url(model_name="m", version=0)


def test_parse_rest_response_synthetic():
    probabilities = [[0.1, 0.9], [0.8, 0.2]]
    rows = {
        "predictions": [
            {"classes": 1, "probabilities": [0.1, 0.9], "logits": [0, 1]},
            {"classes": 0, "probabilities": [0.8, 0.2], "logits": [1, 0]},
        ]
    }
    columns = {"outputs": {"classes": [1, 0], "probabilities": probabilities}}
    for response in (rows, columns, json.dumps(columns).encode()):
        classes, probs = serving.parse_rest_response(response)
        np.testing.assert_array_equal(classes, [1, 0])
        assert classes.dtype == np.int64
        np.testing.assert_allclose(probs, probabilities)
        assert probs.dtype == np.float32


def test_parse_rest_response_empty_batch():
    classes, probabilities = serving.parse_rest_response({"predictions": []})
    assert classes.shape == (0,) and probabilities.shape == (0, 0)


def test_parse_rest_error_response_raises():
    error = {"error": "Tensor name: images has inconsistent batch size"}
    with pytest.raises(serving.ServingError, match="inconsistent batch"):
        serving.parse_rest_response(error)
    with pytest.raises(serving.ServingError):
        serving.parse_rest_response(json.dumps(error))


@pytest.mark.parametrize(
    "response, match",
    [
        ({"result": []}, "neither"),
        ({"outputs": {"classes": [1]}}, "lacks"),
        ({"outputs": {"classes": [1, 0], "probabilities": [[1.0]]}}, "shape"),
        ({"predictions": [[0.1, 0.9]]}, "list of objects"),
        ([1, 2], "JSON object"),
    ],
)
def test_parse_rest_malformed_response_raises(response, match):
    with pytest.raises(ValueError, match=match):
        serving.parse_rest_response(response)


@pytest.mark.parametrize("signature_name", export.SIGNATURE_NAMES)
def test_grpc_round_trip_through_saved_model(model, signatures, pixels, signature_name):
    predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    _, sigs = signatures
    signature = sigs[signature_name]
    request = serving.grpc_predict_request(
        _images_for(signature_name, pixels),
        model_name="fmnist",
        signature_name=signature_name,
        version=2,
    )
    assert isinstance(request, predict_pb2.PredictRequest)
    assert request.model_spec.name == "fmnist"
    assert request.model_spec.signature_name == signature_name
    assert request.model_spec.version.value == 2

    # Decode as the server would: by the signature's input name and dtype.
    input_name, spec = _input_spec(signature)
    assert list(request.inputs) == [input_name]
    assert request.inputs[input_name].dtype == spec.dtype.as_datatype_enum
    array = tf.make_ndarray(request.inputs[input_name])
    assert spec.shape.is_compatible_with(array.shape)
    outputs = signature(**{input_name: tf.constant(array)})

    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    classes, probabilities = serving.parse_grpc_response(response)
    expected_classes, expected_probabilities = _expected_classes_and_probabilities(model, pixels)
    np.testing.assert_array_equal(classes, expected_classes)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)


def test_grpc_request_without_version(pixels):
    pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    request = serving.grpc_predict_request(pixels, model_name="m")
    assert not request.model_spec.HasField("version")
    assert request.model_spec.signature_name == export.SERVING_DEFAULT
    assert request.inputs["images"].dtype == tf.float32.as_datatype_enum


def test_parse_grpc_response_missing_output_raises():
    predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    response = predict_pb2.PredictResponse()
    response.outputs["classes"].CopyFrom(tf.make_tensor_proto([1, 2]))
    with pytest.raises(ValueError, match="probabilities"):
        serving.parse_grpc_response(response)


def test_grpc_without_serving_api_says_how_to_install(monkeypatch, pixels):
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match=r"keras-adr\[serving\]"):
        serving.grpc_predict_request(pixels, model_name="m")


def _imported_modules(path):
    """Every module `path` imports, at its top or inside a function (`from a import b`: a, a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_export_and_serving_do_not_import_each_other():
    # What both need is in keras_adr.signatures, below them.
    package = pathlib.Path(serving.__file__).parent
    export_files = sorted((package / "export").glob("*.py"))
    assert len(export_files) > 1
    for path in export_files:
        assert "keras_adr.serving" not in _imported_modules(path), path
    serving_imports = _imported_modules(package / "serving.py")
    assert "keras_adr.signatures" in serving_imports
    assert not {name for name in serving_imports if name.split(".")[:2] == ["keras_adr", "export"]}
