"""An exponential moving average (EMA) of the weights, through Keras' optimizer `use_ema`.

The averaged weights are checked against an independent numpy EMA of the
recorded weight trajectory: Keras' rule is `average = w_1` after the first
step, then `average = m * average + (1 - m) * w_t`.
"""

import keras
import numpy as np
import pytest
from test_checkpoint_callbacks import _Killed, _StopAfter

from keras_adr import _keras_compat, data, pipeline, presets
from keras_adr.callbacks import AtomicBackupAndRestore, AtomicModelCheckpoint

MOMENTUM = 0.7


def _model(use_ema=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = keras.optimizers.SGD(0.1, use_ema=use_ema, ema_momentum=MOMENTUM)
    model.compile(optimizer, "mse")
    return model


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


class _Trajectory(keras.callbacks.Callback):
    """The trained weights after every step."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])


def _numpy_ema(trajectory, momentum=MOMENTUM):
    average = [w.copy() for w in trajectory[0]]
    for weights in trajectory[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    return average


def _assert_weights_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_validation_checkpoints_and_final_weights_are_the_numpy_ema(tmp_path):
    x, y = _data()
    x_val, y_val = _data(16, seed=1)
    trajectory = _Trajectory()
    model = _model()
    history = model.fit(
        x,
        y,
        batch_size=8,  # 4 steps an epoch
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(x_val, y_val),
        callbacks=[
            trajectory,
            keras.callbacks.SwapEMAWeights(),
            AtomicModelCheckpoint(str(tmp_path / "epoch{epoch}.keras"), save_averaged_weights=True),
        ],
    )
    assert len(trajectory.weights) == 12
    for epoch in range(3):
        average = _numpy_ema(trajectory.weights[: 4 * (epoch + 1)])
        saved = keras.saving.load_model(tmp_path / f"epoch{epoch + 1}.keras")
        _assert_weights_equal(saved.get_weights(), average)
        # Validation measured the averaged weights (a linear model: numpy's MSE).
        kernel, bias = average
        expected = np.mean((x_val @ kernel + bias - y_val) ** 2)
        assert history.history["val_loss"][epoch] == pytest.approx(expected, rel=1e-5)
    # `fit` ends with the average in the model.
    _assert_weights_equal(model.get_weights(), _numpy_ema(trajectory.weights))

    # Training itself went on from the trained weights, not the swapped-in average.
    plain = _model(use_ema=False)
    plain_trajectory = _Trajectory()
    plain.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[plain_trajectory])
    _assert_weights_equal(trajectory.weights[-1], plain_trajectory.weights[-1])


def test_averaged_weights_need_an_optimizer_that_keeps_them(tmp_path):
    x, y = _data()
    model = _model(use_ema=False)
    checkpoint = AtomicModelCheckpoint(str(tmp_path / "m.keras"), save_averaged_weights=True)
    with pytest.raises(ValueError, match="use_ema=True"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[checkpoint])
    assert not _keras_compat.uses_ema(model)
    with _keras_compat.averaged_weights(model):  # no average: nothing to swap
        pass


def test_a_resumed_run_keeps_the_average(tmp_path):
    x, y = _data()
    fit = dict(batch_size=8, epochs=4, shuffle=False, verbose=0)
    uninterrupted = _model()
    uninterrupted.fit(x, y, **fit)

    interrupted = _model()
    with pytest.raises(_Killed):
        interrupted.fit(
            x,
            y,
            callbacks=[AtomicBackupAndRestore(str(tmp_path / "backup")), _StopAfter(2)],
            **fit,
        )
    resumed = _model()
    history = resumed.fit(x, y, callbacks=[AtomicBackupAndRestore(str(tmp_path / "backup"))], **fit)
    assert history.epoch == [2, 3]
    _assert_weights_equal(resumed.get_weights(), uninterrupted.get_weights())
    # ... and the average is not the trained weights (the check has teeth).
    plain = _model(use_ema=False)
    plain.fit(x, y, **fit)
    assert not np.allclose(plain.get_weights()[0], resumed.get_weights()[0], atol=1e-4)


def test_a_run_evaluates_checkpoints_and_exports_the_averaged_weights(tmp_path, monkeypatch):
    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    import tensorflow as tf

    trajectory = _Trajectory()
    callbacks = pipeline._callbacks
    monkeypatch.setattr(pipeline, "_callbacks", lambda *a: [trajectory, *callbacks(*a)])
    options = pipeline.TrainOptions(
        output_dir=str(tmp_path / "run"),
        strategy="default",
        verbose=0,
        train_examples=160,
        validation_examples=32,
        test_examples=16,
        batch_size=32,  # 4 steps an epoch
        epochs=2,
        eval_attacks=("pgd2", "apgd_ce2"),
        ema_momentum=MOMENTUM,
    )
    metrics = pipeline.run(options, presets.get("pgd_at", attack_steps=1))
    assert len(trajectory.weights) == 8
    steps = 4 * metrics["selected_epoch"]
    best = keras.saving.load_model(tmp_path / "run" / "best.keras")
    _assert_weights_equal(best.get_weights(), _numpy_ema(trajectory.weights[:steps]))
    final = keras.saving.load_model(tmp_path / "run" / "final.keras")
    _assert_weights_equal(final.get_weights(), _numpy_ema(trajectory.weights))

    exported = tf.saved_model.load(metrics["export_path"])
    images = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype("float32")
    served = exported.signatures["serving_default"](images=tf.constant(images))["logits"]
    np.testing.assert_allclose(served.numpy(), best.backbone(images).numpy(), atol=1e-4)
    assert metrics["options"]["ema_momentum"] == MOMENTUM
