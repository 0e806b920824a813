"""TF Serving's warm-up file of an exported version, which the server runs before serving it.

`write_warmup_requests()` writes `assets.extra/tf_serving_warmup_requests`,
a TFRecord of `PredictionLog`s: one `PredictRequest` for each signature and
each batch size of `WARMUP_BATCH_SIZES`. TF Serving runs them when it loads
the version, so that the first client request is not slow. Without
`tensorflow-serving-api`, whose protos the file is made of, no file is
written.
"""

import os

import numpy as np
import tensorflow as tf

from keras_adr import signatures
from keras_adr.export.metadata import METADATA_DIRNAME

# TF Serving runs the requests in this file (a TFRecord of PredictionLogs) when
# it loads a version, before serving it: the first client request is not slow.
WARMUP_FILENAME = "tf_serving_warmup_requests"
# Batch sizes of the warm-up requests, one request each per signature.
WARMUP_BATCH_SIZES = (1, 4, 16)


def write_warmup_requests(version_dir, image_shape):
    """Writes TF Serving's warm-up file into `version_dir`'s `assets.extra`.

    One `PredictRequest` per signature and batch size of
    `WARMUP_BATCH_SIZES`, of random (seeded) valid pixels.

    Args:
        version_dir: The (temporary) version directory.
        image_shape: `(H, W, C)` of the model's input.

    Returns:
        The number of requests written; 0 (and no file) without
        `tensorflow-serving-api`, whose protos the file is made of.
    """
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        return 0

    directory = os.path.join(version_dir, METADATA_DIRNAME)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    count = 0
    with tf.io.TFRecordWriter(os.path.join(directory, WARMUP_FILENAME)) as writer:
        for name in signatures.SIGNATURE_NAMES:
            for batch_size in WARMUP_BATCH_SIZES:
                pixels = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
                # The model name is the server's (models.config); TF Serving
                # reads only the signature name of a warm-up request.
                request = signatures.grpc_predict_request(
                    pixels, model_name="", signature_name=name
                )
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                count += 1
    return count
