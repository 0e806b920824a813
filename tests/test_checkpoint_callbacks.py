"""`AtomicBackupAndRestore` and `AtomicModelCheckpoint`: a kill while saving loses nothing.

A kill in the middle of Keras' own `save_weights`/`save` is simulated by a
model whose save writes a truncated HDF5 file and then raises (what a
`SIGKILL` leaves behind, minus the clean-up that only an exception allows,
which the tests undo by re-creating the torn file).
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_adr.callbacks import AtomicBackupAndRestore, AtomicModelCheckpoint


class _Killed(Exception):
    pass


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")


class _StopAfter(keras.callbacks.Callback):
    """Ends `fit` by an exception after `epochs` epochs (the backup already written)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise _Killed


def _torn_save(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)  # An HDF5 signature, then nothing.
    raise _Killed


def test_backup_resumes_from_the_last_epoch_with_its_weights(tmp_path):
    x, y = _data()
    backup = AtomicBackupAndRestore(str(tmp_path / "backup"))
    model = _model()
    with pytest.raises(_Killed):
        model.fit(x, y, epochs=5, verbose=0, callbacks=[backup, _StopAfter(2)])
    saved = [w.copy() for w in model.get_weights()]

    resumed = _model()
    history = resumed.fit(
        x, y, epochs=5, verbose=0, callbacks=[AtomicBackupAndRestore(str(tmp_path / "backup"))]
    )
    assert history.epoch == [2, 3, 4]

    # The restored weights are those of the end of epoch 2: training them for
    # 3 more epochs equals what the resumed run reached.
    again = _model()
    again.set_weights(saved)
    again.optimizer.build(again.trainable_variables)
    again.fit(x, y, epochs=3, verbose=0)
    for expected, got in zip(again.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_kill_while_saving_the_backup_keeps_the_previous_state(tmp_path):
    x, y = _data()
    backup_dir = tmp_path / "backup"
    model = _model()
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[AtomicBackupAndRestore(str(backup_dir), delete_checkpoint=False)],
    )
    state_before = os.path.realpath(backup_dir / "latest")
    weights_before = [w.copy() for w in model.get_weights()]

    # The third epoch's save is torn: its state directory holds a broken file.
    model.save_weights = _torn_save
    with pytest.raises(_Killed):
        model.fit(
            x,
            y,
            epochs=3,
            initial_epoch=2,
            verbose=0,
            callbacks=[AtomicBackupAndRestore(str(backup_dir))],
        )
    # An exception clears its state; a SIGKILL would not: re-create one.
    torn = backup_dir / "state-killed"
    torn.mkdir()
    (torn / "training_metadata.json").write_text(json.dumps({"epoch": 3, "batch": 0}))
    with pytest.raises(_Killed):
        _torn_save(str(torn / "latest.weights.h5"))
    assert os.path.realpath(backup_dir / "latest") == state_before

    resumed = _model()
    history = resumed.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[AtomicBackupAndRestore(str(backup_dir), delete_checkpoint=False)],
    )
    assert history.epoch == []  # Epochs 0 and 1 were done; nothing left.
    for expected, got in zip(weights_before, resumed.get_weights()):
        np.testing.assert_array_equal(got, expected)
    # The torn state is gone; only the linked one is left.
    assert sorted(p.name for p in backup_dir.iterdir() if p.name.startswith("state-")) == [
        os.path.basename(state_before)
    ]


def test_kill_while_saving_the_checkpoint_keeps_the_previous_file(tmp_path):
    x, y = _data()
    path = tmp_path / "best.keras"
    model = _model()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[AtomicModelCheckpoint(str(path))])
    before = path.read_bytes()
    weights_before = [w.copy() for w in model.get_weights()]

    model.save = _torn_save
    with pytest.raises(_Killed):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AtomicModelCheckpoint(str(path))])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]
    for expected, got in zip(weights_before, keras.saving.load_model(path).get_weights()):
        np.testing.assert_array_equal(got, expected)
    # A SIGKILL would have left the torn temporary; the next run deletes it.
    leftover = tmp_path / ".best.keras.tmp-1-0.keras"
    leftover.write_bytes(b"torn")
    del model.save
    model.fit(x, y, epochs=1, verbose=0, callbacks=[AtomicModelCheckpoint(str(path))])
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]
    for expected, got in zip(model.get_weights(), keras.saving.load_model(path).get_weights()):
        np.testing.assert_array_equal(got, expected)


def test_checkpoint_keeps_save_best_only_and_weights_files(tmp_path):
    x, y = _data()
    path = tmp_path / "best.weights.h5"
    model = _model()
    checkpoint = AtomicModelCheckpoint(
        str(path),
        monitor="loss",
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=-1.0,
    )
    model.fit(x, y, epochs=2, verbose=0, callbacks=[checkpoint])
    assert not path.exists()  # No epoch beat the threshold: nothing written.
    checkpoint = AtomicModelCheckpoint(
        str(path), monitor="loss", save_best_only=True, save_weights_only=True
    )
    model.fit(x, y, epochs=2, verbose=0, callbacks=[checkpoint])
    restored = _model()
    restored.load_weights(path)
    for expected, got in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["best.weights.h5"]
