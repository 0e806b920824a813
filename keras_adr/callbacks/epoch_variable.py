"""`EpochVariable`: a variable that holds the epoch being trained."""

import keras


class EpochVariable(keras.callbacks.Callback):
    """Sets a variable to the epoch number at the start of every epoch.

    `keras_adr.data.load(..., shuffle=True, epoch=variable)` draws each
    epoch's order from it, so the order depends on the epoch's number, not
    on how many epochs this process has run: a run resumed by
    `BackupAndRestore` at epoch N shuffles as an uninterrupted one did.

    Args:
        variable: A scalar int64 `tf.Variable`, created outside any
            distribution strategy's scope.
    """

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)
