"""Exports a trained `.keras` model as a TF Serving version.

Example:

```
adr-export --model_path=runs/adr_trades/model.keras \
    --export_dir=saved_models/fashion_mnist \
    --metadata_json='{"preset": "adr_trades"}'
```
"""

import json
import os
import sys

from absl import app, flags, logging

from keras_adr import cli

FLAGS = flags.FLAGS

flags.DEFINE_string("model_path", None, "Trained model, a `.keras` file.")
flags.DEFINE_string("export_dir", None, "TF Serving base path; versions go in subdirectories.")
flags.DEFINE_integer("version", None, "Version to write; defaults to the next free one.")
flags.DEFINE_bool("overwrite", False, "Replace the version if it exists.")
flags.DEFINE_string(
    "metadata_json",
    None,
    "JSON object recorded in the export's assets.extra metadata.",
)
flags.mark_flags_as_required(["model_path", "export_dir"])


def _fail(message):
    sys.exit(f"adr-export: error: {message}")


def _metadata():
    if not FLAGS.metadata_json:
        return {}
    try:
        metadata = json.loads(FLAGS.metadata_json)
    except ValueError as e:
        _fail(f"--metadata_json is not valid JSON: {e}.")
    if not isinstance(metadata, dict):
        _fail('--metadata_json must be a JSON object, e.g. \'{"preset": "adr_pgd"}\'.')
    return metadata


def _load(path):
    import zipfile

    import keras

    import keras_adr

    if not os.path.exists(path):
        _fail(f"--model_path {path!r} does not exist.")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        _fail(f"--model_path {path!r} is not a Keras model file (a .keras archive).")
    try:
        # The optimizer and losses are not needed to serve.
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - any failure to read the archive is the user's file
        _fail(
            f"--model_path {path!r} is corrupt or not a keras-adr model: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
    if isinstance(model, keras_adr.ADRModel):
        # What adr-train saves: serve the classifier it wraps, as adr-train's
        # own export does.
        model = model.backbone
    # Serve in float32 whatever the training precision: the same weights,
    # computed without bfloat16/float16 rounding (adr-train exports the same).
    from keras_adr import precision

    return precision.with_policy(model, "float32")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.version is not None and FLAGS.version < 1:
        _fail(f"--version must be a positive integer; got {FLAGS.version}.")
    metadata = _metadata()
    # Imported here so that `--help` does not wait for TensorFlow.
    from keras_adr import export

    model = _load(FLAGS.model_path)
    try:
        path = export.export_saved_model(
            model,
            FLAGS.export_dir,
            version=FLAGS.version,
            metadata={"source_model_path": FLAGS.model_path, **metadata},
            overwrite=FLAGS.overwrite,
        )
    except FileExistsError:
        _fail(
            f"version {FLAGS.version} already exists in {FLAGS.export_dir!r}; pass "
            "--overwrite to replace it, or another --version."
        )
    except (ValueError, OSError) as e:
        _fail(str(e))
    logging.info("Exported %s to %s", FLAGS.model_path, path)
    print(path)


def run():
    cli.run_program(main, __name__)


if __name__ == "__main__":
    run()
