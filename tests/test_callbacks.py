"""DivergenceGuard: stops runaway and non-finite runs, restores the best weights.

FastestCompilation: keeps the fastest of several compilations of the step.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adr.callbacks import DivergenceGuard, FastestCompilation


class _Scripted(keras.Model):
    """Logs a scripted loss per epoch; every step adds 1 to a weight.

    `losses[e]` is the loss of epoch e (the last batch's value is what Keras
    logs at the epoch end); `slow` grows by 2x per epoch, `fast` follows the
    loss, so `fast` is the term that grew most when the loss runs away.
    """

    def __init__(self, losses, steps_per_epoch):
        super().__init__()
        self.counter = keras.layers.Dense(1, kernel_initializer="zeros")
        self.counter.build((None, 3))
        self.scripted = tf.constant(losses, tf.float32)
        self.steps_per_epoch = steps_per_epoch
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

    def call(self, x):
        return self.counter(x)

    def train_step(self, data):
        epoch = self.step // self.steps_per_epoch
        self.step.assign_add(1)
        self.counter.kernel.assign_add(tf.ones_like(self.counter.kernel))
        loss = self.scripted[epoch]
        return {
            "loss": loss,
            "fast": loss,
            "slow": tf.pow(2.0, tf.cast(epoch, tf.float32)),
            "accuracy": tf.constant(0.5),
        }


def _fit(losses, guard, steps_per_epoch=2):
    model = _Scripted(losses, steps_per_epoch)
    model.compile(optimizer="sgd")
    x = np.zeros((2 * steps_per_epoch, 3), np.float32)
    history = model.fit(
        x, np.zeros(len(x)), batch_size=2, epochs=len(losses), verbose=0, callbacks=[guard]
    )
    return model, history


def test_runaway_loss_stops_and_restores_the_best_weights():
    guard = DivergenceGuard(factor=5.0)
    model, history = _fit([2.0, 1.0, 3.0, 6.0, 50.0, 60.0], guard)
    # 6 > 5 * 1 at epoch 4 (1-based): training stops there.
    assert guard.diverged and len(history.history["loss"]) == 4
    assert "epoch 4" in guard.reason and "`fast`" in guard.reason
    # Weights of epoch 2 (the smallest loss): 2 epochs x 2 steps of +1.
    np.testing.assert_allclose(model.counter.kernel.numpy(), 4.0)
    assert guard.best_epoch == 1


def test_loss_falling_without_bound_stops_too():
    """The paper's ADR objective runs away towards -inf."""
    guard = DivergenceGuard(factor=5.0)
    # The keras-adr history of issue 9: |-9.2| > 5 * 1.7 at epoch 4.
    _, history = _fit([3.4, 2.5, 1.7, -9.2, -22.0], guard)
    assert guard.diverged and len(history.history["loss"]) == 4
    assert "-9.2" in guard.reason and "epoch 3)" in guard.reason


def test_non_finite_loss_stops_at_once():
    guard = DivergenceGuard()
    model, history = _fit([1.0, math.nan, 0.5], guard)
    assert guard.diverged and "nan" in guard.reason.lower()
    assert len(history.history["loss"]) == 2
    np.testing.assert_allclose(model.counter.kernel.numpy(), 2.0)  # epoch 1's weights


def test_healthy_run_is_left_alone():
    guard = DivergenceGuard(factor=2.0)
    model, history = _fit([1.4, 1.0, 0.9, 1.1, 0.8], guard)
    assert not guard.diverged and guard.reason is None
    assert len(history.history["loss"]) == 5
    np.testing.assert_allclose(model.counter.kernel.numpy(), 10.0)  # nothing restored


def test_floor_keeps_near_zero_losses_from_tripping():
    guard = DivergenceGuard(factor=5.0, loss_floor=0.1)
    _, history = _fit([0.01, 0.001, 0.3], guard)
    assert not guard.diverged and len(history.history["loss"]) == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(factor=1.0), "factor"),
        (dict(factor="5"), "factor"),
        (dict(loss_floor=-1.0), "loss_floor"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceGuard(**kwargs)


def test_robust_accuracy_is_logged_for_checkpoints(tmp_path):
    from conftest import blob_data, tiny_cnn

    import keras_adr

    keras.utils.set_random_seed(0)
    x, y = blob_data(96)
    model = keras_adr.ADRModel(tiny_cnn(), keras_adr.presets.get("pgd_at", attack_steps=1))
    model.compile(optimizer="adam")
    robust = keras_adr.callbacks.RobustAccuracy(
        (x[:32], y[:32]), epsilon=0.1, attacks=("pgd3", "apgd_ce5"), every=2
    )
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="val_robust_accuracy", mode="max", save_best_only=True
    )
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[robust, checkpoint])
    # Logged at epoch 2 only (every=2), and read by ModelCheckpoint.
    assert len(history.history["val_robust_accuracy"]) == 1
    value = history.history["val_robust_accuracy"][0]
    assert 0.0 <= value <= history.history["val_robust_accuracy_clean"][0]
    assert value == robust.last_result.robust_accuracy
    assert (tmp_path / "best.keras").exists()
    with pytest.raises(ValueError, match="APGD"):
        keras_adr.callbacks.RobustAccuracy((x, y), epsilon=0.1, attacks=("fgsm",))


def test_default_guard_stops_the_measured_collapse():
    """adr_pgd_paper in benchmarks/stability.py: epoch losses 3.43, 2.56, 2.32, -8.43, 10.68."""
    guard = DivergenceGuard()
    _, history = _fit([3.43, 2.56, 2.32, -8.43, 10.68, 13.47], guard)
    assert guard.diverged and len(history.history["loss"]) == 4
    # After a collapse to a constant loss, the jump alone trips it too.
    guard = DivergenceGuard()
    _, history = _fit([3.43, 2.56, 2.32, 10.68, 13.47], guard)
    assert guard.diverged and len(history.history["loss"]) == 4


def test_robust_accuracy_progress_bar_follows_verbose_and_feeds_early_stopping(capsys):
    import warnings

    from conftest import blob_data, tiny_cnn

    import keras_adr

    keras.utils.set_random_seed(1)
    x, y = blob_data(64)
    model = keras_adr.ADRModel(tiny_cnn(), keras_adr.presets.get("pgd_at", attack_steps=1))
    model.compile(optimizer="adam")
    suite = dict(epsilon=0.1, attacks=("pgd2", "apgd_ce3"), batch_size=8)
    # 16 held-out examples = 2 batches, for the clean pass and each of 2 attacks.
    robust = keras_adr.callbacks.RobustAccuracy((x[:16], y[:16]), verbose=1, **suite)
    early = keras.callbacks.EarlyStopping(monitor="val_robust_accuracy", mode="max", patience=5)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # EarlyStopping warns when its monitor is missing.
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[robust, early])
    out = capsys.readouterr().out
    assert out.count("val_robust_accuracy (pgd2, apgd_ce3, epsilon 0.1):") == 2
    assert "6/6" in out and "7/6" not in out
    values = history.history["val_robust_accuracy"]
    assert len(values) == 2 and early.best == max(values)
    # "auto" follows fit's verbose: silent here; 2 prints one line per evaluation.
    for verbose, expected in (("auto", ""), (2, f"{robust.name} (pgd2, apgd_ce3")):
        callback = keras_adr.callbacks.RobustAccuracy((x[:16], y[:16]), verbose=verbose, **suite)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
        out = capsys.readouterr().out
        assert out.startswith(expected) and "/6" not in out
    with pytest.raises(ValueError, match="verbose"):
        keras_adr.callbacks.RobustAccuracy((x, y), verbose=3, **suite)


def test_divergence_guard_config_round_trip():
    guard = DivergenceGuard(factor=5, loss_floor=0.5, restore_best_weights=False, monitor="ce")
    again = DivergenceGuard(**guard.get_config())
    assert (
        again.get_config()
        == guard.get_config()
        == {
            "factor": 5.0,
            "loss_floor": 0.5,
            "restore_best_weights": False,
            "monitor": "ce",
        }
    )


# --- FastestCompilation -------------------------------------------------------------


class _Clock:
    """A clock that moves only when a slowed step runs: step times are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


_CLOCK = _Clock()


def _slowed(function, seconds=0.03):
    def call(iterator):
        _CLOCK.now += seconds
        return function(iterator)

    return call


class _SlowFirstCompilation(keras.callbacks.Callback):
    """Makes the step Keras compiled at the start of `fit` slow (put before the other)."""

    def on_train_begin(self, logs=None):
        self.model.train_function = _slowed(self.model.train_function)
        self.slow_function = self.model.train_function


class SlowRecompilations(keras.Model):
    """A model whose step compiled anew (`force=True`) is slow."""

    def make_train_function(self, force=False):
        result = super().make_train_function(force=force)
        if force:
            self.train_function = _slowed(self.train_function)
        return result


def _dense_model(model_class=keras.Model):
    inputs = keras.Input((3,))
    model = model_class(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _fit_batches(model, callbacks, batches=12, epochs=1):
    x = np.random.default_rng(0).normal(size=(4 * batches, 3)).astype("float32")
    return model.fit(x, x[:, :1], batch_size=4, epochs=epochs, callbacks=callbacks, verbose=0)


def test_fastest_compilation_replaces_a_slow_first_compilation():
    model = _dense_model(keras.Model)
    slow, fastest = (
        _SlowFirstCompilation(),
        FastestCompilation(2, steps=3, warmup_steps=1, clock=_CLOCK),
    )
    before = model.get_weights()[0].copy()
    history = _fit_batches(model, [slow, fastest], epochs=2)
    assert fastest.kept == 1
    assert fastest.step_seconds == [pytest.approx(0.03), 0.0]
    assert model.train_function is not slow.slow_function
    assert len(history.history["loss"]) == 2  # training went on with the new step
    assert not np.allclose(model.get_weights()[0], before)


def test_fastest_compilation_keeps_the_first_when_recompiling_is_slower():
    model = _dense_model(SlowRecompilations)
    fastest = FastestCompilation(3, steps=3, warmup_steps=1, clock=_CLOCK)
    _fit_batches(model, [fastest], batches=20)
    first = model.train_function
    assert fastest.kept == 0
    assert fastest.step_seconds == [0.0, pytest.approx(0.03), pytest.approx(0.03)]
    # A later fit keeps the choice: no new compilation, the same step.
    _fit_batches(model, [fastest])
    assert model.train_function is first and fastest.kept == 0


def test_fastest_compilation_needs_enough_steps_and_one_compilation_does_nothing():
    model = _dense_model(SlowRecompilations)
    too_long = FastestCompilation(2, steps=20, warmup_steps=1)
    _fit_batches(model, [too_long], batches=12)
    assert too_long.kept is None and too_long.step_seconds is None
    single = FastestCompilation(1)
    function = model.train_function
    _fit_batches(model, [single], batches=12)
    assert model.train_function is function and single.kept is None


def test_fastest_compilation_refuses_several_workers(monkeypatch):
    from keras_adr.callbacks import fastest_compilation

    monkeypatch.setattr(fastest_compilation.distribute, "num_workers", lambda strategy: 2)
    with pytest.raises(ValueError, match="several workers"):
        _fit_batches(_dense_model(), [FastestCompilation(2)])
    _fit_batches(_dense_model(), [FastestCompilation(1)])  # nothing to choose, nothing to refuse


def test_fastest_compilation_config_round_trip():
    callback = FastestCompilation(3, steps=5, warmup_steps=2)
    assert FastestCompilation(**callback.get_config()).get_config() == callback.get_config()
    assert callback.get_config() == {"compilations": 3, "steps": 5, "warmup_steps": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compilations=0), "`compilations` must be an integer >= 1; got 0"),
        (dict(steps=1.5), "`steps` must be an integer >= 1"),
        (dict(warmup_steps=0), "`warmup_steps` must be an integer >= 1"),
    ],
)
def test_fastest_compilation_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastestCompilation(**kwargs)
