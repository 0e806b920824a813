"""Exports a trained `.keras` model as a TF Serving version.

Example:

```
adr-export --model_path=runs/adr_trades/model.keras \
    --export_dir=saved_models/fashion_mnist \
    --metadata_json='{"preset": "adr_trades"}'
```
"""

import json

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS

flags.DEFINE_string("model_path", None, "Trained model, a `.keras` file.")
flags.DEFINE_string(
    "export_dir", None, "TF Serving base path; versions go in subdirectories."
)
flags.DEFINE_integer(
    "version", None, "Version to write; defaults to the next free one."
)
flags.DEFINE_bool("overwrite", False, "Replace the version if it exists.")
flags.DEFINE_string(
    "metadata_json",
    None,
    "JSON object recorded in the export's assets.extra metadata.",
)
flags.mark_flags_as_required(["model_path", "export_dir"])


def main(argv):
    del argv  # Unused.
    # Imported here so that `--help` does not wait for TensorFlow.
    import keras

    import keras_adr  # noqa: F401 - registers the custom objects.
    from keras_adr import export

    metadata = json.loads(FLAGS.metadata_json) if FLAGS.metadata_json else {}
    if not isinstance(metadata, dict):
        raise app.UsageError("--metadata_json must be a JSON object.")
    # The optimizer and losses are not needed to serve.
    model = keras.models.load_model(FLAGS.model_path, compile=False)
    if isinstance(model, keras_adr.ADRModel):
        # What adr-train saves: serve the classifier it wraps, as adr-train's
        # own export does.
        model = model.backbone
    path = export.export_saved_model(
        model,
        FLAGS.export_dir,
        version=FLAGS.version,
        metadata={"source_model_path": FLAGS.model_path, **metadata},
        overwrite=FLAGS.overwrite,
    )
    logging.info("Exported %s to %s", FLAGS.model_path, path)
    print(path)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
