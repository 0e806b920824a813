"""The serving signatures of an exported classifier, as both its exporter and its clients see them.

This module holds the contract between `keras_adr.export`, which writes the
SavedModel, and `keras_adr.serving`, which builds requests to it: the
signature, input and output names, each signature's input dtype, which
version numbers TF Serving accepts, how images become a signature's input
array, and the gRPC `PredictRequest` that carries them (also what the
export's warm-up file is made of). Both modules import this one, which
imports neither, so neither of them needs the other.
"""

import numbers

import numpy as np

from keras_adr import layers

SERVING_DEFAULT = "serving_default"
SERVE_UINT8 = "serve_uint8"
SIGNATURE_NAMES = (SERVING_DEFAULT, SERVE_UINT8)

INPUT_NAME = "images"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASSES = "classes"
OUTPUT_LOGITS = "logits"
OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_CLASSES, OUTPUT_LOGITS)

# Input dtype of each signature; clients use it to encode their requests.
SIGNATURE_INPUT_DTYPES = {SERVING_DEFAULT: "float32", SERVE_UINT8: "uint8"}

# TF Serving stores versions as int64.
MAX_VERSION = 2**63 - 1


def validate_version(version):
    """Returns `version` as an int if TF Serving can serve it, else raises.

    Args:
        version: The version number: an integer (Python or NumPy) in
            `[1, 2**63 - 1]`.

    Returns:
        `version` as a Python int.

    Raises:
        ValueError: If `version` is not a positive int64 (a bool is refused).
    """
    # bool is an int subclass, but `version=True` is surely a mistake.
    if (
        isinstance(version, bool)
        or not isinstance(version, numbers.Integral)
        or not 0 < version <= MAX_VERSION
    ):
        raise ValueError(
            "`version` must be a positive integer (TF Serving versions are "
            f"int64). Received: {version!r}"
        )
    return int(version)


def encode_images(images, signature_name, input_dtype=None):
    """Validates images and converts them to a signature's input dtype.

    Args:
        images: Array-like of shape `(batch, H, W, C)`, either uint8 pixels
            or floats in `[0, 1]`.
        signature_name: The signature the images are for.
        input_dtype: The signature input's dtype, `"float32"` or `"uint8"`.
            Defaults to the dtype of `signature_name` in
            `SIGNATURE_INPUT_DTYPES`, else to that of `images`. uint8
            images sent to a float32 input are divided by 255.

    Returns:
        A NumPy array of the input dtype.

    Raises:
        ValueError: If `images` is not rank 4, has an unsupported dtype, is
            not finite, or lies outside `[0, 1]` for a float input.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"`images` must have rank 4, (batch, H, W, C). Received shape: {images.shape}"
        )
    if input_dtype is None:
        input_dtype = SIGNATURE_INPUT_DTYPES.get(signature_name, images.dtype)
    input_dtype = np.dtype(input_dtype)
    is_uint8 = images.dtype == np.uint8
    if not (is_uint8 or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(
            f"`images` must be uint8 pixels or floats in [0, 1]. Received dtype: {images.dtype}"
        )
    if input_dtype == np.uint8:
        if not is_uint8:
            # Quantising floats would silently change the request.
            raise ValueError(
                f"Signature {signature_name!r} takes uint8 pixels; received "
                f"{images.dtype}. Send uint8 images, or use a float32 "
                f"signature such as {SERVING_DEFAULT!r}."
            )
        return images
    if input_dtype != np.float32:
        raise ValueError(f"`input_dtype` must be float32 or uint8. Received: {input_dtype}")
    if is_uint8:
        return images.astype(np.float32) / np.float32(255.0)
    images = images.astype(np.float32)
    # The server rejects these too (the same check runs in the signature);
    # failing here gives a clearer message, and strict JSON cannot encode
    # NaN or Inf anyway.
    return layers.check_pixels(images, 0.0, 1.0, hint="Divide uint8 pixels by 255.")


def grpc_predict_request(
    images,
    *,
    model_name,
    signature_name=SERVING_DEFAULT,
    version=None,
    input_name=INPUT_NAME,
    input_dtype=None,
):
    """Builds a TF Serving gRPC `PredictRequest`.

    Args:
        images: Array-like of shape `(batch, H, W, C)`, either uint8 pixels
            or floats in `[0, 1]`.
        model_name: Name of the model in the server's `models.config`.
        signature_name: Signature to call.
        version: Optional version to pin; defaults to the latest served.
        input_name: Name of the signature's image input.
        input_dtype: See `encode_images()`.

    Returns:
        A `tensorflow_serving.apis.predict_pb2.PredictRequest`.

    Raises:
        ImportError: If `tensorflow-serving-api` is not installed.
        ValueError: As `encode_images()`, or if `version` is invalid.
    """
    predict_pb2 = _import_predict_pb2()
    import tensorflow as tf

    images = encode_images(images, signature_name, input_dtype)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = validate_version(version)
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(images, shape=images.shape))
    return request


def _import_predict_pb2():
    try:
        from tensorflow_serving.apis import predict_pb2
    except ImportError as err:
        raise ImportError(
            "gRPC requests need the `tensorflow-serving-api` package: "
            "`pip install keras-adr[serving]`."
        ) from err
    return predict_pb2
