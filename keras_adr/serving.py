"""Client-side helpers for models exported by `keras_adr.export`.

Builds TF Serving REST and gRPC predict requests and parses their responses.
Nothing here needs a running server. Input and output names and dtypes are
parameters that default to what `export_saved_model()` writes (the names of
`keras_adr.signatures`), so the same helpers work with other signatures.
`grpc_predict_request` is `keras_adr.signatures.grpc_predict_request`, which
the export also uses for its warm-up requests.

REST example:

```python
import requests

body = rest_predict_body(images)  # float32 in [0, 1], or uint8
url = rest_predict_url(model_name="fashion_mnist")
response = requests.post(url, json=body)
classes, probabilities = parse_rest_response(response.json())
```

gRPC example (needs `pip install keras-adr[serving]`):

```python
import grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

stub = prediction_service_pb2_grpc.PredictionServiceStub(
    grpc.insecure_channel("localhost:8500"))
request = grpc_predict_request(images, model_name="fashion_mnist")
classes, probabilities = parse_grpc_response(stub.Predict(request, 10.0))
```
"""

import json
import urllib.parse

import numpy as np

from keras_adr import signatures
from keras_adr.signatures import grpc_predict_request

__all__ = [
    "ROW_FORMAT",
    "COLUMNAR_FORMAT",
    "ServingError",
    "rest_predict_body",
    "rest_predict_url",
    "parse_rest_response",
    "grpc_predict_request",
    "parse_grpc_response",
]

ROW_FORMAT = "instances"
COLUMNAR_FORMAT = "inputs"


class ServingError(RuntimeError):
    """Raised when a TF Serving response reports an error."""


def rest_predict_body(
    images,
    *,
    signature_name=signatures.SERVING_DEFAULT,
    format=ROW_FORMAT,
    input_name=signatures.INPUT_NAME,
    input_dtype=None,
):
    """Builds the JSON body of a TF Serving REST `:predict` request.

    Args:
        images: Array-like of shape `(batch, H, W, C)`, either uint8 pixels
            or floats in `[0, 1]`.
        signature_name: Signature to call.
        format: `"instances"` for the row format
            (`{"instances": [{input_name: image}, ...]}`) or `"inputs"` for
            the columnar format (`{"inputs": {input_name: images}}`).
        input_name: Name of the signature's image input.
        input_dtype: The signature input's dtype, `"float32"` or `"uint8"`.
            Defaults to the dtype of `signature_name` in
            `signatures.SIGNATURE_INPUT_DTYPES`, else to that of `images`.
            uint8 images sent to a float32 input are divided by 255.

    Returns:
        A JSON-serialisable dict.

    Raises:
        ValueError: If `images` is not rank 4, has an unsupported dtype, is
            not finite, lies outside `[0, 1]` for a float input, or
            `format` is unknown.
    """
    if format not in (ROW_FORMAT, COLUMNAR_FORMAT):
        raise ValueError(
            f"`format` must be {ROW_FORMAT!r} or {COLUMNAR_FORMAT!r}. Received: {format!r}"
        )
    images = signatures.encode_images(images, signature_name, input_dtype)
    # tolist() yields Python ints/floats, which `json` can serialise.
    values = images.tolist()
    body = {"signature_name": signature_name}
    if format == ROW_FORMAT:
        body[ROW_FORMAT] = [{input_name: image} for image in values]
    else:
        body[COLUMNAR_FORMAT] = {input_name: values}
    return body


def rest_predict_url(*, model_name, host="localhost", port=8501, version=None, scheme="http"):
    """Returns the URL of a TF Serving REST `:predict` endpoint.

    Args:
        model_name: Name of the model in the server's `models.config`.
        host: Server host name or IP address.
        port: REST port (`--rest_api_port`).
        version: Optional version to pin; defaults to the latest served.
        scheme: `"http"` or `"https"`.

    Returns:
        The URL, e.g.
        `http://localhost:8501/v1/models/fashion_mnist/versions/2:predict`.
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal.
    path = f"/v1/models/{urllib.parse.quote(model_name, safe='')}"
    if version is not None:
        path += f"/versions/{signatures.validate_version(version)}"
    return f"{scheme}://{host}:{int(port)}{path}:predict"


def parse_rest_response(
    response_json,
    *,
    classes_key=signatures.OUTPUT_CLASSES,
    probabilities_key=signatures.OUTPUT_PROBABILITIES,
):
    """Parses a TF Serving REST `:predict` response.

    Args:
        response_json: The decoded response (a dict) or its JSON text,
            in row (`{"predictions": [...]}`) or columnar
            (`{"outputs": {...}}`) form.
        classes_key: Name of the classes output.
        probabilities_key: Name of the probabilities output.

    Returns:
        Tuple `(classes, probabilities)`: int64 array of shape `(batch,)` and
        float32 array of shape `(batch, num_classes)`.

    Raises:
        ServingError: If the response is an error response.
        ValueError: If the response is malformed or lacks an output.
    """
    if isinstance(response_json, (str, bytes, bytearray)):
        response_json = json.loads(response_json)
    if not isinstance(response_json, dict):
        raise ValueError(
            f"Expected a JSON object response. Received: {type(response_json).__name__}"
        )
    if "error" in response_json:
        raise ServingError(f"TF Serving error: {response_json['error']}")
    if "predictions" in response_json:
        outputs = _columns_from_rows(response_json["predictions"], (classes_key, probabilities_key))
    elif "outputs" in response_json:
        outputs = response_json["outputs"]
    else:
        raise ValueError(
            "Response has neither 'predictions' (row format) nor 'outputs' "
            f"(columnar format). Keys: {sorted(response_json)}"
        )
    return _classes_and_probabilities(outputs, classes_key, probabilities_key)


def parse_grpc_response(
    response,
    *,
    classes_key=signatures.OUTPUT_CLASSES,
    probabilities_key=signatures.OUTPUT_PROBABILITIES,
):
    """Parses a TF Serving gRPC `PredictResponse`.

    Args:
        response: A `PredictResponse` (or anything with an `outputs` map of
            `TensorProto`s).
        classes_key: Name of the classes output.
        probabilities_key: Name of the probabilities output.

    Returns:
        Tuple `(classes, probabilities)` as in `parse_rest_response()`.

    Raises:
        ValueError: If an output is missing or has the wrong shape.
    """
    import tensorflow as tf

    outputs = {
        key: tf.make_ndarray(response.outputs[key])
        for key in (classes_key, probabilities_key)
        if key in response.outputs
    }
    return _classes_and_probabilities(outputs, classes_key, probabilities_key)


def _columns_from_rows(predictions, keys):
    """Turns row-format predictions into a dict of columns."""
    if not isinstance(predictions, list) or not all(isinstance(row, dict) for row in predictions):
        raise ValueError(
            f"Row-format 'predictions' must be a list of objects with the outputs {list(keys)}."
        )
    return {
        key: [row[key] for row in predictions]
        for key in keys
        if all(key in row for row in predictions)
    }


def _classes_and_probabilities(outputs, classes_key, probabilities_key):
    missing = [k for k in (classes_key, probabilities_key) if k not in outputs]
    if missing:
        raise ValueError(f"Response lacks outputs {missing}. Available: {sorted(outputs)}")
    classes = np.asarray(outputs[classes_key], dtype=np.int64)
    probabilities = np.asarray(outputs[probabilities_key], dtype=np.float32)
    if classes.shape == (0,) and probabilities.size == 0:
        # An empty batch decodes as `[]`, which loses the class axis.
        probabilities = probabilities.reshape(0, 0)
    if classes.ndim != 1 or probabilities.ndim != 2 or classes.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"Expected {classes_key!r} of shape (batch,) and "
            f"{probabilities_key!r} of shape (batch, num_classes). Received "
            f"{classes.shape} and {probabilities.shape}."
        )
    return classes, probabilities
