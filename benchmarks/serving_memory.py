"""Peak memory of one large request to the exported serving signature.

Exports an untrained `small_cnn`, calls `serving_default` once on 8 images
(warm-up), then once on `--images` random images, and prints the process's
peak resident memory before and after (`ru_maxrss`). The signature runs the
model on chunks of `keras_adr.export.SERVING_CHUNK` images.

Usage: python -m benchmarks.serving_memory --images=32768
"""

import resource
import tempfile

from absl import app, flags

flags.DEFINE_integer("images", 32768, "Images in the large request.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    import keras_adr

    path = keras_adr.export.export_saved_model(keras_adr.models.small_cnn(), tempfile.mkdtemp())
    serve = tf.saved_model.load(path).signatures["serving_default"]
    serve(images=tf.zeros([8, 28, 28, 1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    images = tf.constant(np.random.default_rng(0).random((FLAGS.images, 28, 28, 1), np.float32))
    classes = serve(images=images)["classes"]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{int(classes.shape[0])} images ({images.numpy().nbytes / 2**20:.0f} MiB of input), "
        f"chunks of {keras_adr.export.SERVING_CHUNK}: peak RSS {before:.0f} MiB before the "
        f"request, {after:.0f} MiB after (+{after - before:.0f} MiB)"
    )


if __name__ == "__main__":
    app.run(main)
