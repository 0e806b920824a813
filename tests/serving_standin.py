"""A stand-in for TF Serving's Predict API, to run the client commands of docs/serving.md.

No Docker engine or TF Serving binary runs where the tests run, so this
serves what `docker run tensorflow/serving --model_config_file=...` would: it
reads the `ModelServerConfig` text proto with TF Serving's own proto, loads
the latest integer version of each model's base path (TF Serving's default
version policy), and answers

* REST `POST /v1/models/<name>[/versions/<v>]:predict` in the row
  (`instances`) and columnar (`inputs`) formats, replying `predictions` or
  `outputs` as TF Serving does; errors as `{"error": ...}` with status 400;
* gRPC `tensorflow.serving.PredictionService/Predict`.

It decodes requests only through each signature's input names, dtypes and
shapes, so a client that builds a request the real server would reject
fails here too.
"""

import http.server
import json
import os
import re
import threading
from concurrent import futures

import numpy as np
import tensorflow as tf

_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")


def _latest_version(base_path):
    versions = [int(name) for name in os.listdir(base_path) if name.isdigit()]
    if not versions:
        raise ValueError(f"No integer version under {base_path}.")
    return max(versions)


def load_models(config_path, path_map=None):
    """`{name: {version: loaded SavedModel}}` of a `models.config` file.

    Args:
        config_path: The `ModelServerConfig` text proto.
        path_map: Optional `(container_prefix, host_dir)`: base paths under
            the container prefix are read from the host directory (Docker's
            `-v host_dir:container_prefix`).
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(config_path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    models = {}
    for model in config.model_config_list.config:
        base_path = model.base_path
        if path_map and base_path.startswith(path_map[0].rstrip("/") + "/"):
            base_path = os.path.join(path_map[1], base_path[len(path_map[0].rstrip("/")) + 1 :])
        version = _latest_version(base_path)
        models[model.name] = {version: tf.saved_model.load(os.path.join(base_path, str(version)))}
    return models


def _signature(models, name, version, signature_name):
    if name not in models:
        raise ValueError(f"Servable not found for request: Latest({name})")
    versions = models[name]
    version = max(versions) if version is None else int(version)
    if version not in versions:
        raise ValueError(f"Servable not found for request: Specific({name}, {version})")
    signatures = versions[version].signatures
    signature_name = signature_name or "serving_default"
    if signature_name not in signatures:
        raise ValueError(f'Serving signature name: "{signature_name}" not found')
    return signatures[signature_name]


def _run(signature, columns):
    """Runs `signature` on `{input name: array-like}`, checked against its inputs."""
    _, specs = signature.structured_input_signature
    if set(columns) != set(specs):
        raise ValueError(f"inputs {sorted(columns)} do not match the signature's {sorted(specs)}")
    feeds = {}
    for key, spec in specs.items():
        array = np.asarray(columns[key], dtype=spec.dtype.as_numpy_dtype)
        if not spec.shape.is_compatible_with(array.shape):
            raise ValueError(f"input {key} has shape {array.shape}, expected {spec.shape}")
        feeds[key] = tf.constant(array)
    return {key: value.numpy() for key, value in signature(**feeds).items()}


def rest_predict(models, path, body):
    """The REST reply (status, JSON dict) to `POST path` with JSON `body`."""
    match = _PREDICT_PATH.match(path)
    if not match:
        return 404, {"error": f"Malformed request: POST {path}"}
    try:
        signature = _signature(models, match.group(1), match.group(2), body.get("signature_name"))
        _, specs = signature.structured_input_signature
        if "instances" in body:
            rows = body["instances"]
            if len(specs) == 1 and rows and not isinstance(rows[0], dict):
                rows = [{next(iter(specs)): row} for row in rows]
            columns = {key: [row[key] for row in rows] for key in specs}
            outputs = _run(signature, columns)
            if len(outputs) == 1:
                return 200, {"predictions": next(iter(outputs.values())).tolist()}
            count = len(rows)
            return 200, {
                "predictions": [
                    {key: value[i].tolist() for key, value in outputs.items()} for i in range(count)
                ]
            }
        if "inputs" in body:
            inputs = body["inputs"]
            if not isinstance(inputs, dict):
                inputs = {next(iter(specs)): inputs}
            outputs = _run(signature, inputs)
            return 200, {"outputs": {key: value.tolist() for key, value in outputs.items()}}
        return 400, {"error": "Missing 'inputs' or 'instances' key"}
    except (ValueError, KeyError, TypeError) as error:
        return 400, {"error": str(error)}


class _RestHandler(http.server.BaseHTTPRequestHandler):
    models = None

    def do_POST(self):  # noqa: N802  (the http.server API)
        length = int(self.headers.get("Content-Length", 0))
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as error:
            status, reply = 400, {"error": f"JSON Parse error: {error}"}
        else:
            status, reply = rest_predict(self.models, self.path, body)
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        del args


class Server:
    """REST and gRPC servers over `load_models(...)`; a context manager.

    Ports: the given ones (TF Serving's 8501 and 8500 in docs/serving.md), or free
    ephemeral ones when 0. `rest_port` and `grpc_port` hold the bound ports.
    """

    def __init__(self, models, rest_port=0, grpc_port=0):
        self.models = models
        self._rest_port = rest_port
        self._grpc_port = grpc_port

    def __enter__(self):
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        models = self.models

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):  # noqa: N802  (the gRPC API)
                spec = request.model_spec
                try:
                    signature = _signature(
                        models,
                        spec.name,
                        spec.version.value if spec.HasField("version") else None,
                        spec.signature_name,
                    )
                    outputs = _run(
                        signature, {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                    )
                except ValueError as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                response = predict_pb2.PredictResponse()
                response.model_spec.CopyFrom(spec)
                for key, value in outputs.items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
                return response

        handler = type("Handler", (_RestHandler,), {"models": models})
        self._http = http.server.ThreadingHTTPServer(("localhost", self._rest_port), handler)
        self.rest_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"localhost:{self._grpc_port}")
        if not self.grpc_port:
            self._http.shutdown()
            raise OSError(f"cannot bind gRPC port {self._grpc_port}")
        self._grpc.start()
        return self

    def __exit__(self, *exc_info):
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()
