"""`AtomicBackupAndRestore`: `BackupAndRestore` whose training state is replaced atomically.

`AtomicBackupAndRestore` is Keras' own `BackupAndRestore` whose files are
replaced in one rename: Keras writes them in place, so a process killed while
saving leaves a truncated HDF5 file that the next run cannot open
(`OSError: bad object header version number`).
"""

import json
import os
import shutil

from keras_adr import _keras_compat, fileio


class AtomicBackupAndRestore(_keras_compat.BackupAndRestoreHooks):
    """`keras.callbacks.BackupAndRestore` whose training state is replaced atomically.

    Each save writes the weights and the epoch into a fresh directory
    `<backup_dir>/state-*` and then points the symbolic link
    `<backup_dir>/latest` at it with one rename, so a kill at any moment
    leaves the previous state or the new one, never a torn file nor the
    weights of one epoch with the epoch number of another. Loading is
    Keras' own, through the link. Local file systems only (symbolic links).

    Args:
        backup_dir: Directory of the training state (this callback's alone).
        save_freq: `"epoch"` or a number of batches, as in Keras.
        delete_checkpoint: Delete `backup_dir` when `fit` ends, as in Keras.
        restore_from: The `backup_dir` whose state is restored (default:
            `backup_dir`). In a multi-worker run every worker restores the
            chief's state, so that all resume at the same epoch even when a
            worker died before writing its own.
    """

    _STATE_PREFIX = "state-"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True, restore_from=None):
        restored = os.path.join(restore_from or backup_dir, "latest")
        # Keras restores from these two paths; they resolve through the link.
        super().__init__(
            backup_dir,
            os.path.join(restored, "latest.weights.h5"),
            os.path.join(restored, "training_metadata.json"),
            save_freq=save_freq,
            delete_checkpoint=delete_checkpoint,
        )
        self._latest = os.path.join(backup_dir, "latest")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._remove_stale_states()

    def write_state(self, epoch, batch):
        os.makedirs(self.backup_dir, exist_ok=True)
        state, lock_fd = fileio.make_locked_temp_dir(self.backup_dir, self._STATE_PREFIX)
        try:
            self.model.save_weights(os.path.join(state, "latest.weights.h5"))
            metadata = {"epoch": epoch, "batch": batch}
            with open(os.path.join(state, "training_metadata.json"), "w") as f:
                json.dump(metadata, f)
            fileio.fsync_tree(state)
            link = fileio.unique_temp_path(self.backup_dir, ".latest-")
            os.symlink(os.path.basename(state), link)
            os.replace(link, self._latest)
            fileio.fsync_dir(self.backup_dir)
        except BaseException:
            shutil.rmtree(state, ignore_errors=True)
            raise
        finally:
            fileio.unlock(lock_fd)
        self._remove_stale_states()

    def _remove_stale_states(self):
        """Deletes every state but the linked one (left by a kill or replaced)."""
        if not os.path.isdir(self.backup_dir):
            return
        current = os.path.realpath(self._latest) if os.path.islink(self._latest) else None
        for name in os.listdir(self.backup_dir):
            path = os.path.join(self.backup_dir, name)
            if name.startswith(self._STATE_PREFIX) and os.path.realpath(path) != current:
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".latest-"):
                fileio.remove_quietly(path)
