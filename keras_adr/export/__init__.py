"""Atomic SavedModel export in the TensorFlow Serving directory layout.

TF Serving watches a *base path* and serves each child directory whose name
parses as an integer as one version of the model:

```
base_dir/
  1/                      <- version 1: a complete SavedModel
    saved_model.pb
    variables/...
    assets.extra/keras_adr_metadata.json
    assets.extra/tf_serving_warmup_requests
  2/
  .tmp-export-3-4242-9f2c...   <- export in progress, ignored by TF Serving
```

`export_saved_model()` writes each version into a hidden temporary directory
beside its final place, flushes it to disk, and renames it into place only
when it is complete. A rename within one file system is atomic, so a reader
(or a crash at any moment) sees either no new version or a complete one.

Every export has two signatures:

- `serving_default`: `images` float32 `[batch, H, W, C]` with values in
  `[0, 1]`.
- `serve_uint8`: `images` uint8 `[batch, H, W, C]`, raw pixels (divided by
  255 inside the graph).

Both return `probabilities` (float32 softmax), `classes` (int64 argmax) and
`logits` (float32). Inputs of the wrong rank, shape or dtype, float inputs
that are not finite and float inputs outside `[0, 1]` make the request fail
with an error instead of returning a confident class: the model was trained
(and its robustness measured) on pixels in `[0, 1]` only, so silently
clipping would hide client bugs such as forgetting to divide by 255.

With `tensorflow-serving-api` installed, each version also holds TF
Serving's warm-up file (`assets.extra/tf_serving_warmup_requests`): a few
requests for each signature, which the server runs when it loads the
version, so that the first client request is not slow.

The package's modules, one job each (`keras_adr.signatures` holds the
signature, input and output names, which `keras_adr.serving` shares):

- `saved_model`: `export_saved_model()`, the steps of one export.
- `signature_graphs`: the two signatures' graphs, written as a SavedModel.
- `metadata`: the metadata file (`read_metadata()`).
- `warmup`: TF Serving's warm-up file.
- `versions`: the version directories, atomic publishing and the
  temporaries of exports that died (`list_versions()`,
  `cleanup_stale_temporaries()`).
- `server_config`: TF Serving's `models.config` (`models_config()`,
  `write_models_config()`).

Example:

```python
path = export_saved_model(model, "saved_models/fashion_mnist",
                          metadata={"preset": "adr_trades"})
write_models_config("saved_models/models.config", "fashion_mnist",
                    "/models/fashion_mnist")
```
"""

from keras_adr.export.metadata import (
    EXPORT_METADATA_FILENAME,
    METADATA_DIRNAME,
    METADATA_FORMAT_VERSION,
    read_metadata,
)
from keras_adr.export.saved_model import export_saved_model
from keras_adr.export.server_config import models_config, write_models_config
from keras_adr.export.signature_graphs import SERVING_CHUNK
from keras_adr.export.versions import (
    TEMP_EXPORT_PREFIX,
    TEMP_REPLACED_PREFIX,
    cleanup_stale_temporaries,
    list_versions,
)
from keras_adr.export.warmup import WARMUP_BATCH_SIZES, WARMUP_FILENAME
from keras_adr.signatures import (
    INPUT_NAME,
    OUTPUT_CLASSES,
    OUTPUT_LOGITS,
    OUTPUT_NAMES,
    OUTPUT_PROBABILITIES,
    SERVE_UINT8,
    SERVING_DEFAULT,
    SIGNATURE_INPUT_DTYPES,
    SIGNATURE_NAMES,
)

__all__ = [
    "EXPORT_METADATA_FILENAME",
    "INPUT_NAME",
    "METADATA_DIRNAME",
    "METADATA_FORMAT_VERSION",
    "OUTPUT_CLASSES",
    "OUTPUT_LOGITS",
    "OUTPUT_NAMES",
    "OUTPUT_PROBABILITIES",
    "SERVE_UINT8",
    "SERVING_CHUNK",
    "SERVING_DEFAULT",
    "SIGNATURE_INPUT_DTYPES",
    "SIGNATURE_NAMES",
    "TEMP_EXPORT_PREFIX",
    "TEMP_REPLACED_PREFIX",
    "WARMUP_BATCH_SIZES",
    "WARMUP_FILENAME",
    "export_saved_model",
    "cleanup_stale_temporaries",
    "read_metadata",
    "list_versions",
    "models_config",
    "write_models_config",
]
