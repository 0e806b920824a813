"""Datasets for adversarial training: offline Fashion-MNIST and TFDS.

Every loader returns a batched, prefetched `tf.data.Dataset` of
`(images, labels)` with `float32` images of shape `[B, H, W, C]` in `[0, 1]`
and `int32` labels of shape `[B]`. Pixels are never normalised here: any
normalisation is a layer inside the model, so that an attack's epsilon always
means the same thing.

Fashion-MNIST (the default) is read from IDX files, which Debian's
`dataset-fashion-mnist` package installs, so it works without network access.
The other datasets come from TensorFlow Datasets (TFDS) and must already be
prepared in a TFDS `data_dir`: `load()` never downloads anything, so a missing
dataset fails at once instead of hanging on an offline machine.

Example:

```python
train_ds = keras_adr.data.load(
    "fashion_mnist", "train[:55000]", batch_size=128, shuffle=True, seed=0
)
val_ds = keras_adr.data.load("fashion_mnist", "train[55000:]", batch_size=512)
```

Modules: `datasets` (descriptions, `load`, augmentation), `fashion_mnist`
(the offline IDX files), `idx` (the IDX reader), `tfds` (prepared TFDS
datasets), `splits` (split names) and `errors`.
"""

from keras_adr.data.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    DatasetInfo,
    augmentation,
    info,
    load,
)
from keras_adr.data.errors import CorruptDatasetError, DatasetNotFoundError
from keras_adr.data.fashion_mnist import DATA_DIR_ENV, DEBIAN_FASHION_MNIST_DIR
from keras_adr.data.idx import read_idx

__all__ = [
    "CorruptDatasetError",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEBIAN_FASHION_MNIST_DIR",
    "DEFAULT_DATASET",
    "DatasetInfo",
    "DatasetNotFoundError",
    "augmentation",
    "info",
    "load",
    "read_idx",
]
