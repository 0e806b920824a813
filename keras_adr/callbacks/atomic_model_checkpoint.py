"""`AtomicModelCheckpoint`: `ModelCheckpoint` whose file is replaced atomically.

`AtomicModelCheckpoint` is Keras' own `ModelCheckpoint` whose file is
replaced in one rename: Keras writes it in place, so a process killed while
saving leaves a truncated HDF5 file that the next run cannot open
(`OSError: bad object header version number`).
"""

import contextlib
import os

from keras_adr import _keras_compat, fileio


def _temp_prefix(name):
    """Prefix of the temporaries `AtomicModelCheckpoint` writes beside `name`."""
    return f".{name}.tmp-"


class AtomicModelCheckpoint(_keras_compat.ModelCheckpointHooks):
    """`keras.callbacks.ModelCheckpoint` whose file is replaced atomically.

    The checkpoint is written beside its final path (a hidden name with the
    same suffix, which `Model.save` requires) and renamed over it, so a kill
    while saving leaves the previous checkpoint intact; the temporary file a
    kill leaves behind is deleted when training starts again.

    Args:
        *args: As `keras.callbacks.ModelCheckpoint`.
        save_averaged_weights: Save the optimizer's moving average of the
            weights (`use_ema=True`) instead of the trained weights: what a
            validation run with `keras.callbacks.SwapEMAWeights()` measured,
            so the checkpoint chosen by a validation metric is the model that
            metric describes. Leave it False with
            `SwapEMAWeights(swap_on_epoch=True)`, which has already put the
            average in place.
        **kwargs: As `keras.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args, save_averaged_weights=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_averaged_weights = save_averaged_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.save_averaged_weights and not _keras_compat.uses_ema(self.model):
            raise ValueError(
                "AtomicModelCheckpoint(save_averaged_weights=True) needs an optimizer that "
                "keeps an average of the weights: compile with e.g. "
                "keras.optimizers.Adam(use_ema=True)."
            )
        if "{" in self.filepath:  # A formatted name: its temporaries are not known.
            return
        directory, name = os.path.split(os.path.abspath(self.filepath))
        if os.path.isdir(directory):
            for other in os.listdir(directory):
                if other.startswith(_temp_prefix(name)):
                    fileio.remove_quietly(os.path.join(directory, other))

    def write_checkpoint(self, final_path):
        directory, name = os.path.split(os.path.abspath(final_path))
        os.makedirs(directory, exist_ok=True)
        suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
        temp_path = fileio.unique_temp_path(directory, _temp_prefix(name)) + suffix
        averaged = (
            _keras_compat.averaged_weights(self.model)
            if self.save_averaged_weights
            else contextlib.nullcontext()
        )
        try:
            with averaged:
                if self.save_weights_only:
                    self.model.save_weights(temp_path, overwrite=True)
                else:
                    self.model.save(temp_path, overwrite=True)
            os.replace(temp_path, final_path)
        finally:
            fileio.remove_quietly(temp_path)
        fileio.fsync_dir(directory)
