"""The one place that reaches into Keras' private API, fenced by version.

Where Keras has no public hook, keras-adr uses these, and nothing else of
Keras' private API:

- `averaged_weights`: puts an optimizer's moving average of the weights into
  the model for a moment (to save it) and back, through `SwapEMAWeights`'
  own swap, so distributed variables are handled as Keras handles them.
- `BackupAndRestoreHooks`: `keras.callbacks.BackupAndRestore` whose state is
  written by a public `write_state(epoch, batch)` (keras-adr's atomic form).
- `ModelCheckpointHooks`: `keras.callbacks.ModelCheckpoint` whose file is
  written by a public `write_checkpoint(path)`.
- `compile_metrics`: a model's container of its compiled metrics.
- `replace_symbolic_build`: the trainer's build-from-a-batch method
  (`distribute.patch_keras_fit`).

`KERAS_RANGE` is the range of Keras versions the tests cover (the newest and
the oldest, in CI); `check_keras_version` refuses any other before a private
attribute is used.
"""

import contextlib
import functools
import re

import keras

# [low, high): requirements.txt pins the same range. It starts at 3.10 because
# ModelCheckpoint._should_save_model appeared then; the trainer method that
# `replace_symbolic_build` replaces has the same signature from 3.8 to 3.15.
# Upstream issue of that method: https://github.com/keras-team/keras/issues/20585
KERAS_RANGE = ((3, 10), (3, 16))


class UnsupportedKerasError(ValueError):
    """The installed Keras is outside `KERAS_RANGE` (a setup error, not a bug)."""


def _version_text(version):
    return ".".join(map(str, version))


def check_keras_version(version=None):
    """Raises `UnsupportedKerasError` unless Keras is in `KERAS_RANGE`.

    Args:
        version: A version string; defaults to the installed `keras.version()`.
    """
    version = version or keras.version()
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = KERAS_RANGE
    if match is None or not low <= tuple(map(int, match.groups())) < high:
        raise UnsupportedKerasError(
            f"keras-adr supports Keras >={_version_text(low)},<{_version_text(high)} but Keras "
            f"{version} is installed: pip install "
            f"'keras>={_version_text(low)},<{_version_text(high)}' (requirements.txt)."
        )


def uses_ema(model):
    """Whether `model`'s optimizer keeps a moving average of the weights (`use_ema=True`)."""
    return bool(getattr(getattr(model, "optimizer", None), "use_ema", False))


def _swapper(model):
    swapper = keras.callbacks.SwapEMAWeights()
    if not hasattr(swapper, "_swap_variables"):
        raise RuntimeError(
            f"keras_adr cannot swap the EMA weights with Keras {keras.__version__}: "
            "keras.callbacks.SwapEMAWeights has no _swap_variables. Install a Keras release "
            "that keras_adr supports (see requirements.txt)."
        )
    swapper.set_model(model)
    return swapper


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block, `model` holds its optimizer's averaged (EMA) weights.

    The trained weights are put back on leaving, also on an exception. A
    model whose optimizer keeps no average is left as it is.

    Args:
        model: A compiled `keras.Model` whose optimizer has taken a step.
    """
    if not uses_ema(model):
        yield model
        return
    swapper = _swapper(model)
    swapper._swap_variables()
    try:
        yield model
    finally:
        swapper._swap_variables()


class BackupAndRestoreHooks(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that saves through `write_state`.

    Keras restores from `weights_path` and `metadata_path` (set at
    construction) and saves through its private `_save_model`, which this
    class routes to `write_state(epoch, batch)`, for a subclass to implement.
    """

    def __init__(self, backup_dir, weights_path, metadata_path, **kwargs):
        check_keras_version()
        super().__init__(backup_dir, **kwargs)
        self._weights_path = weights_path
        self._training_metadata_path = metadata_path

    def _save_model(self):
        self.write_state(self._current_epoch, self._last_batch_seen)

    def write_state(self, epoch, batch):
        """Writes the training state of `epoch` (and `batch` within it)."""
        raise NotImplementedError


class ModelCheckpointHooks(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that writes through `write_checkpoint`.

    Keras' choice of when and where to save (and its update of `best`) stays
    Keras'; the file is written by `write_checkpoint(path)`, for a subclass.
    """

    def __init__(self, *args, **kwargs):
        check_keras_version()
        super().__init__(*args, **kwargs)

    def _save_model(self, epoch, batch, logs):
        path = self._get_file_path(epoch, batch, logs)
        # Also updates `self.best`, as in Keras.
        if self._should_save_model(epoch, batch, logs, path):
            self.write_checkpoint(path)

    def write_checkpoint(self, path):
        """Writes the model (or its weights) to `path`."""
        raise NotImplementedError


@functools.cache
def _installed_keras_checked():
    check_keras_version()
    return True


def compile_metrics(model):
    """`model`'s container of the metrics given to `compile`, or None."""
    _installed_keras_checked()  # read often (`Model.metrics`): checked once
    return getattr(model, "_compile_metrics", None)


def replace_symbolic_build(model, build):
    """Replaces the trainer's build-from-a-batch method on `model`; returns the original.

    `build(original, iterator=None, data_batch=None)` is called in its place.
    """
    check_keras_version()
    original = model._maybe_symbolic_build
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: build(
        original, iterator=iterator, data_batch=data_batch
    )
    return original
