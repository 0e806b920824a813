"""The TensorFlow graphs of an export's two serving signatures, written as a SavedModel.

`write_saved_model()` traces `serving_default` (float32 pixels in `[0, 1]`)
and `serve_uint8` (raw uint8 pixels, divided by 255 in the graph) around a
Keras classifier and writes them with `keras.export.ExportArchive`. Each
signature checks its input's shape, and the float one also checks that its
pixels are finite and in `[0, 1]`, inside the graph, since TF Serving feeds
tensors straight into it; the model runs on chunks of `SERVING_CHUNK`
images, and the signatures return probabilities, classes and logits.
"""

import keras
import tensorflow as tf

from keras_adr import layers
from keras_adr.signatures import (
    INPUT_NAME,
    OUTPUT_CLASSES,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    SERVE_UINT8,
    SERVING_DEFAULT,
)

# Images per model call inside the serving signatures: bounds a request's
# activation memory (the small CNN needs about 256 KiB per image).
SERVING_CHUNK = 1024


def model_image_shape(model):
    """Returns `(H, W, C)` of the model's single image input.

    Args:
        model: A built Keras model.

    Returns:
        The tuple `(H, W, C)` of positive ints.

    Raises:
        ValueError: If the model's input is not one rank-4 image input of
            fully defined shape `(None, H, W, C)`.
    """
    try:
        shape = model.input_shape
    except (AttributeError, ValueError) as err:
        raise ValueError(
            "Cannot read the model's input shape; build it on a "
            f"`keras.Input` of shape (H, W, C) before export. Error: {err}"
        ) from err
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or any(not isinstance(d, int) or d <= 0 for d in shape[1:])
    ):
        raise ValueError(
            "The model must have one rank-4 image input with fully defined "
            f"(H, W, C), e.g. (None, 28, 28, 1). Received: {shape}"
        )
    return tuple(shape[1:])


def write_saved_model(model, image_shape, directory):
    """Writes the SavedModel with both signatures into `directory`.

    Args:
        model: The classifier; `model(x, training=False)` returns logits.
        image_shape: `(H, W, C)` of its input, from `model_image_shape()`.
        directory: Where to write the SavedModel.

    Returns:
        Tuple `(signatures, num_classes)` where `signatures` describes each
        signature's inputs and outputs for the metadata.

    Raises:
        ValueError: If the model does not return one rank-2 logits tensor.
    """
    batch_shape = (None, *image_shape)

    def serve_float(images):
        return _predict(model, _checked_float_images(images, image_shape))

    def serve_uint8(images):
        return _predict(model, _uint8_to_float_images(images, image_shape))

    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoints = {
        SERVING_DEFAULT: (serve_float, tf.float32),
        SERVE_UINT8: (serve_uint8, tf.uint8),
    }
    signatures = {}
    num_classes = None
    for name, (fn, dtype) in endpoints.items():
        spec = tf.TensorSpec(batch_shape, dtype, name=INPUT_NAME)
        endpoint = archive.add_endpoint(name, fn, input_signature=[spec])
        outputs = endpoint.get_concrete_function().structured_outputs
        num_classes = outputs[OUTPUT_LOGITS].shape[-1]
        signatures[name] = {
            "inputs": {INPUT_NAME: _describe_spec(spec)},
            "outputs": {key: _describe_spec(tensor) for key, tensor in outputs.items()},
        }
    archive.write_out(directory, verbose=False)
    return signatures, num_classes


def _checked_float_images(images, image_shape):
    """Adds in-graph checks that float images have `image_shape`, are finite and in [0, 1]."""
    # The signature's TensorSpec is checked by Python callers only; TF
    # Serving feeds tensors straight into the graph, so check again here.
    images = tf.ensure_shape(images, (None, *image_shape))
    return layers.check_pixels(
        images, 0.0, 1.0, hint="Divide uint8 pixels by 255 or use the 'serve_uint8' signature."
    )


def _uint8_to_float_images(images, image_shape):
    """Checks the shape of uint8 images and scales them to [0, 1]."""
    images = tf.ensure_shape(images, (None, *image_shape))
    return tf.cast(images, tf.float32) / 255.0


def _predict(model, images):
    """Returns the output dict of both signatures for images in [0, 1].

    The model runs on chunks of `SERVING_CHUNK` images, one after the other,
    so that a large request needs the memory of one chunk's activations (an
    empty request returns empty outputs).
    """
    spec = model.compute_output_spec(
        keras.KerasTensor((SERVING_CHUNK, *images.shape[1:]), dtype="float32")
    )
    if not hasattr(spec, "shape") or len(spec.shape) != 2 or spec.shape[-1] is None:
        raise ValueError(
            "`model(images, training=False)` must return one logits tensor "
            f"of shape (batch, num_classes). Received: {spec!r}"
        )
    num_classes = spec.shape[-1]
    num_chunks = (tf.shape(images)[0] + SERVING_CHUNK - 1) // SERVING_CHUNK
    chunks = tf.TensorArray(
        tf.float32,
        size=num_chunks,
        infer_shape=False,
        element_shape=tf.TensorShape([None, num_classes]),
    )

    def body(i, chunks):
        chunk = images[i * SERVING_CHUNK : (i + 1) * SERVING_CHUNK]
        # Mixed-precision models return float16/bfloat16 logits; serve float32.
        return i + 1, chunks.write(i, tf.cast(model(chunk, training=False), tf.float32))

    _, chunks = tf.while_loop(lambda i, _: i < num_chunks, body, (0, chunks), parallel_iterations=1)
    logits = tf.cond(num_chunks > 0, chunks.concat, lambda: tf.zeros([0, num_classes], tf.float32))
    logits = tf.debugging.assert_all_finite(logits, "the model produced non-finite logits")
    return {
        OUTPUT_PROBABILITIES: tf.nn.softmax(logits, axis=-1),
        OUTPUT_CLASSES: tf.argmax(logits, axis=-1, output_type=tf.int64),
        OUTPUT_LOGITS: logits,
    }


def _describe_spec(tensor):
    return {"dtype": tensor.dtype.name, "shape": tensor.shape.as_list()}
