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


# Bounds of --metadata_json: a record of the run, not a data store (and a
# deep nest would exhaust the recursion of the JSON parser and writer).
MAX_METADATA_CHARS = 64 * 1024
MAX_METADATA_DEPTH = 32


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number (use null or a string)")


def _depth(value):
    """The nesting depth of a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return deepest


def _metadata():
    if not FLAGS.metadata_json:
        return {}
    if len(FLAGS.metadata_json) > MAX_METADATA_CHARS:
        _fail(
            f"--metadata_json is {len(FLAGS.metadata_json):,} characters; keep it under "
            f"{MAX_METADATA_CHARS:,} (put large records in a file and name it in the metadata)."
        )
    try:
        metadata = json.loads(FLAGS.metadata_json, parse_constant=_reject_constant)
    except RecursionError:
        depth = MAX_METADATA_DEPTH + 1
    except ValueError as e:
        _fail(f"--metadata_json is not valid JSON: {e}.")
    else:
        depth = _depth(metadata)
    if depth > MAX_METADATA_DEPTH:
        _fail(f"--metadata_json is nested too deeply; keep it within {MAX_METADATA_DEPTH} levels.")
    if not isinstance(metadata, dict):
        _fail('--metadata_json must be a JSON object, e.g. \'{"preset": "adr_pgd"}\'.')
    return metadata


def _load(path):
    import zipfile

    import keras

    # Registers the custom objects (ADRModel and, through it, the layers).
    from keras_adr.adr_model import ADRModel

    if not os.path.exists(path):
        _fail(f"--model_path {path!r} does not exist.")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        _fail(f"--model_path {path!r} is not a Keras model file (a .keras archive).")
    try:
        # The optimizer and losses are not needed to serve.
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - any failure to read the archive is the user's file
        if "safe_mode" in str(e):
            _fail(
                f"--model_path {path!r} holds a Lambda layer and was not loaded: Keras' safe "
                "mode refuses Python code in model files. Rebuild the model with built-in or "
                "registered layers (keras.saving.register_keras_serializable) and save it again."
            )
        _fail(
            f"--model_path {path!r} is corrupt or not a keras-adr model: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
    if isinstance(model, ADRModel):
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
    import tensorflow as tf

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
    except (OSError, tf.errors.OpError) as e:
        if not cli.is_disk_full(e):
            _fail(str(e))
        # The variables, plus about a megabyte of graph and warm-up requests.
        _fail(cli.disk_full_message(e, FLAGS.export_dir, 4 * model.count_params() + 2**20))
    except ValueError as e:
        _fail(str(e))
    logging.info("Exported %s to %s", FLAGS.model_path, path)
    print(path)


def run():
    cli.run_program(main, __name__)


if __name__ == "__main__":
    run()
