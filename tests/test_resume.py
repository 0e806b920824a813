"""Exact resume: a run killed and resumed ends where an uninterrupted one does.

The state a resumed epoch depends on is restored or recomputed from the
epoch number: the weights and optimizer (with the learning-rate step) from
`BackupAndRestore`, the data order from `data.load(..., epoch=)`, the
training attack's random start from the optimizer's step, and the
divergence guard's record from `history.csv`.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adr import attacks, callbacks, data

_ROOT = os.path.dirname(os.path.dirname(__file__))


def _orders(dataset):
    return [np.concatenate([labels.numpy() for _, labels in dataset])]


def test_the_order_of_an_epoch_follows_its_number():
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    load = lambda: data.load(
        "fashion_mnist", "test", batch_size=16, take=64, shuffle=True, seed=3, epoch=epoch
    )
    uninterrupted = load()
    orders = []
    for e in range(3):
        epoch.assign(e)
        orders.append(
            [int(i) for i in np.concatenate([y for _, y in uninterrupted.as_numpy_iterator()])]
        )
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[1])  # a permutation of the same examples
    # A new process (a new dataset) resumed at epoch 2 sees epoch 2's order.
    resumed = load()
    epoch.assign(2)
    assert [int(i) for i in np.concatenate([y for _, y in resumed.as_numpy_iterator()])] == orders[
        2
    ]
    # Without the variable the dataset reshuffles from its own generator: the
    # first iteration of a new dataset repeats epoch 0, not epoch 2.
    plain = lambda: data.load("fashion_mnist", "test", batch_size=16, take=64, shuffle=True, seed=3)
    first, second = plain(), plain()
    a = [int(i) for i in np.concatenate([y for _, y in first.as_numpy_iterator()])]
    assert a == [int(i) for i in np.concatenate([y for _, y in second.as_numpy_iterator()])]


def test_a_seeded_pgd_start_is_a_function_of_the_seed():
    model = keras.Sequential(
        [keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    x = tf.random.stateless_uniform([8, 4, 4, 1], [0, 1])
    y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    run = lambda seed, loss="ce": attacks.pgd(
        model, x, y, epsilon=0.1, step_size=0.01, steps=1, loss=loss, seed=seed
    ).numpy()
    for loss in ("ce", "kl"):
        a, b = run(tf.constant([5, 7], tf.int64), loss), run(tf.constant([5, 7], tf.int64), loss)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, run(tf.constant([5, 8], tf.int64), loss))
        # The stateful path draws afresh.
        tf.random.uniform([1])
        assert np.abs(a - x.numpy()).max() <= 0.1 + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_a_resumed_guard_stops_where_an_uninterrupted_one_does():
    logs = [{"loss": 1.0}, {"loss": 0.5}, {"loss": 0.9}, {"loss": 1.6}]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    def run(guard, epochs):
        guard.set_model(model)
        guard.on_train_begin()
        for epoch in epochs:
            guard.on_epoch_begin(epoch)
            guard.on_epoch_end(epoch, dict(logs[epoch]))
            if guard.diverged:
                return epoch
        return None

    assert run(callbacks.DivergenceGuard(factor=3.0), range(4)) == 3
    # Resumed at epoch 2 with epochs 0-1 logged (and a rerun epoch 2 logged
    # before the kill, which must not count): stops at epoch 3 as well.
    logged = {0: logs[0], 1: logs[1], 2: {"loss": 0.1}}
    resumed = callbacks.DivergenceGuard(factor=3.0, logged_epochs=logged)
    assert run(resumed, range(2, 4)) == 3 and resumed.best_epoch == 1
    # Without the record, the resumed guard would not have stopped.
    assert run(callbacks.DivergenceGuard(factor=3.0), range(2, 4)) is None


_FLAGS = [
    "--train_examples=768",
    "--validation_examples=128",
    "--test_examples=32",
    "--batch_size=64",
    "--attack_steps=2",
    # Small steps, so that the random start matters (2 steps of the default
    # 2.5 * eps / 2 mostly end on the ball's corners whatever the start).
    "--step_size=0.02",
    "--eval_attacks=pgd2,apgd_ce2",
    "--epochs=3",
    "--export=false",
    "--deterministic",
    "--verbose=0",
]


def _command(out, defense):
    return [
        sys.executable,
        "-m",
        "keras_adr.cli.train",
        f"--output_dir={out}",
        f"--defense={defense}",
        *_FLAGS,
    ]


def _backed_up_epoch(out):
    try:
        path = os.path.join(out, "backup", "latest", "training_metadata.json")
        return json.load(open(path))["epoch"]
    except (OSError, ValueError):
        return None


def _final_weights(out):
    return keras.saving.load_model(os.path.join(out, "final.keras")).get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["adr_pgd"])
def test_a_run_killed_in_epoch_2_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, defense):
    kill_seed = random.randrange(2**31)
    jitter = random.Random(kill_seed).uniform(0.0, 0.5)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    process = subprocess.Popen(
        _command(resumed, defense), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=_ROOT
    )
    deadline = time.time() + 300
    while _backed_up_epoch(resumed) is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(jitter)  # a random point of epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    backed_up = _backed_up_epoch(resumed)
    assert backed_up in (1, 2), f"not killed mid-run (kill seed {kill_seed}): {backed_up}"

    for out in (resumed, whole):
        result = subprocess.run(
            _command(out, defense), capture_output=True, text=True, timeout=600, cwd=_ROOT
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_final_weights(resumed), _final_weights(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"kill seed {kill_seed}")
    # Validation repeats too, so best.keras is the same epoch's.
    history = [
        json.load(open(os.path.join(o, "metrics.json")))["history"] for o in (resumed, whole)
    ]
    for name in ("val_adv_accuracy", "val_loss", "loss"):
        np.testing.assert_allclose(history[0][name], history[1][name], rtol=1e-5, err_msg=name)
