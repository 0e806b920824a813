"""`EpochSeconds`: each epoch's wall time in the logs."""

import time

import keras


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to the logs as `epoch_seconds`.

    Put it before `CSVLogger`: the times then live in the history file, so
    the training time of a resumed run can be summed over all its epochs.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.time() - self._started
