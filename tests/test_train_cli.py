"""adr-train end to end on tiny subsets: outputs, resume after SIGKILL, divergence, errors."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from keras_adr import data
from keras_adr.pipeline import read_history

_TINY = [
    "--train_examples=384",
    "--validation_examples=128",
    "--test_examples=64",
    "--batch_size=64",
    "--attack_steps=2",
    "--eval_attacks=pgd3,apgd_ce5",
    "--verbose=0",
]


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist():
    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


def _command(output_dir, *flags):
    return [
        sys.executable,
        "-m",
        "keras_adr.cli.train",
        f"--output_dir={output_dir}",
        *_TINY,
        *flags,
    ]


def _run(output_dir, *flags, timeout=300):
    return subprocess.run(
        _command(output_dir, *flags),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def _epochs_logged(output_dir):
    path = os.path.join(output_dir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_train_writes_metrics_checkpoint_and_export(tmp_path):
    out = tmp_path / "run"
    result = _run(out, "--epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 256 and metrics["epochs_run"] == 1
    assert metrics["adr_config"]["attack"]["steps"] == 2
    assert metrics["options"]["defense"] == "adr_pgd"
    evaluation = metrics["evaluation"]
    assert evaluation["num_examples"] == 64
    assert set(evaluation["attack_accuracy"]) == {"pgd3", "apgd_ce5"}
    assert metrics["robust_accuracy"] <= min(evaluation["attack_accuracy"].values())
    assert "val_adv_accuracy" in metrics["history"]
    assert (out / "best.keras").exists() and (out / "history.csv").exists()
    assert (out / "tensorboard").is_dir()
    loaded = tf.saved_model.load(metrics["export_path"])
    assert set(loaded.signatures) >= {"serving_default", "serve_uint8"}
    assert "clean accuracy" in result.stdout

    # The adr-export example (docs/serving.md), on both models adr-train saves.
    for name in ("final.keras", "best.keras"):
        export_dir = tmp_path / f"export_{name}"
        exported = subprocess.run(
            [
                sys.executable,
                "-m",
                "keras_adr.cli.export",
                f"--model_path={out / name}",
                f"--export_dir={export_dir}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        assert exported.returncode == 0, exported.stderr[-3000:]
        served = tf.saved_model.load(str(export_dir / "1")).signatures["serving_default"]
        assert served(images=tf.zeros([2, 28, 28, 1]))["logits"].shape == (2, 10)


@pytest.mark.slow
def test_named_data_dir_is_used_or_rejected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(tmp_path / "run", "--epochs=1", f"--data_dir={empty}")
    assert result.returncode == 1 and str(empty) in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def _backed_up_epoch(out):
    """The epoch a rerun resumes at (the backup's), or None before the first backup."""
    try:
        return json.loads((out / "backup" / "latest" / "training_metadata.json").read_text())[
            "epoch"
        ]
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_killed_run_resumes_from_last_epoch(tmp_path):
    out = tmp_path / "resume"
    flags = ("--epochs=4", "--defense=pgd_at", "--export=false")
    process = subprocess.Popen(
        _command(out, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    deadline = time.time() + 240
    while _backed_up_epoch(out) is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    # The kill may land anywhere, also while a backup or a log row is written.
    time.sleep(_kill_random.uniform(0.0, _KILL_JITTER_SECONDS))
    process.send_signal(signal.SIGKILL)
    process.wait()
    backed_up = _backed_up_epoch(out)
    first = _epochs_logged(out)
    assert backed_up is not None and 1 <= backed_up < 4, f"not killed mid-way: {backed_up}, {first}"

    result = _run(out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = _epochs_logged(out)
    resumed = epochs[len(first) :]
    # The second run starts at the last backed-up epoch instead of from 0; an
    # epoch logged after that backup is run again, and its rerun's row counts.
    assert resumed and resumed[0] == backed_up and resumed[-1] == 3, (backed_up, epochs)
    # metrics.json describes the whole run, not only its resumed part.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4 and len(metrics["history"]["loss"]) == 4
    assert metrics["train_seconds"] > 0


@pytest.mark.slow
def test_divergence_exits_non_zero_with_message(tmp_path):
    result = _run(
        tmp_path / "nan",
        "--epochs=1",
        "--optimizer=sgd",
        "--learning_rate=1e12",
        "--defense=pgd_at",
        "--export=false",
    )
    assert result.returncode == 1
    assert "diverged" in result.stderr
    assert not (tmp_path / "nan" / "metrics.json").exists()


@pytest.mark.slow
def test_bad_flags_exit_with_clear_errors(tmp_path):
    result = _run(tmp_path / "bad", "--epsilon=-0.1")
    assert result.returncode == 1 and "epsilon" in result.stderr
    result = _run(tmp_path / "bad", "--validation_examples=1000")
    assert result.returncode == 1 and "validation_examples" in result.stderr
    result = _run(tmp_path / "bad", "--eval_attacks=fgsm")
    assert result.returncode == 1 and "APGD" in result.stderr


@pytest.mark.slow
def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
    result = _run(tmp_path / "mnist", f"--data_dir={tmp_path / 'empty'}", "--dataset=mnist")
    assert result.returncode == 1
    assert "mnist" in result.stderr and "data_dir" in result.stderr


@pytest.mark.slow
def test_standard_without_validation_still_checkpoints(tmp_path):
    out = tmp_path / "standard"
    result = _run(
        out, "--epochs=1", "--defense=standard", "--validation_examples=0", "--export=false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "best.keras").exists()


def test_resumed_checkpoint_keeps_the_best_logged_value(tmp_path):
    from keras_adr import _run_history as run_history

    history = tmp_path / "history.csv"
    assert run_history.best_logged(str(history), "val_adv_accuracy") is None
    history.write_text("epoch,loss,val_adv_accuracy\n0,1.0,0.41\n1,0.9,0.47\n2,nan,nan\n")
    assert run_history.best_logged(str(history), "val_adv_accuracy") == 0.47
    assert run_history.best_logged(str(history), "adv_accuracy") is None


def _exported_and_checkpoint_logits(metrics, checkpoint):
    import keras

    images = next(iter(data.load("fashion_mnist", "test", batch_size=16, take=16)))[0]
    served = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
    exported = served(images=images)["logits"].numpy()
    expected = keras.saving.load_model(checkpoint)(images, training=False).numpy()
    return exported, expected


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["best", "final"])
def test_evaluation_and_export_use_the_selected_weights(tmp_path, choice):
    import numpy as np

    out = tmp_path / choice
    result = _run(out, "--epochs=2", "--defense=pgd_at", f"--export_weights={choice}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_weights"] == choice
    if choice == "best":
        val = metrics["history"]["val_adv_accuracy"]
        assert metrics["selected_epoch"] == 1 + val.index(max(val))
    else:
        assert metrics["selected_epoch"] is None
    exported, expected = _exported_and_checkpoint_logits(metrics, out / f"{choice}.keras")
    np.testing.assert_allclose(exported, expected, rtol=1e-4, atol=1e-4)


# Kills land at a random point shortly after a stage starts (each stage of a
# tiny run lasts well over this); the seed is printed by pytest on failure.
_KILL_JITTER_SECONDS = 0.5
_KILL_SEED = random.randrange(2**31)
_kill_random = random.Random(_KILL_SEED)


def _kill_when(out, flags, ready, timeout=240):
    """Starts adr-train, SIGKILLs it at a random moment after `ready()` holds.

    Returns whether the process was still running when killed.
    """
    process = subprocess.Popen(
        _command(out, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.01)
    time.sleep(_kill_random.uniform(0.0, _KILL_JITTER_SECONDS))
    killed = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return killed


def _state(out):
    try:
        return json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_kill_during_evaluation_or_export_resumes_that_stage(tmp_path):
    out = tmp_path / "stages"
    flags = ("--epochs=2", "--defense=pgd_at")
    # Killed during the evaluation: training is recorded as finished.
    assert _kill_when(out, flags, lambda: _state(out).get("trained")), f"seed {_KILL_SEED}"
    assert not _state(out).get("evaluation")
    result = _run(out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _epochs_logged(out) == [0, 1]  # training was not redone
    versions = sorted(os.listdir(out / "saved_model"))
    assert versions == ["1"], versions

    # Killed while exporting: the rerun publishes one version, not two.
    out2 = tmp_path / "export"
    exporting = lambda: (
        (out2 / "saved_model").is_dir()
        and any(name.startswith(".tmp-export") for name in os.listdir(out2 / "saved_model"))
    )
    assert _kill_when(out2, flags, exporting), f"seed {_KILL_SEED}"
    result = _run(out2, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _epochs_logged(out2) == [0, 1]
    assert [n for n in os.listdir(out2 / "saved_model") if not n.startswith(".")] == ["1"]
    metrics = json.loads((out2 / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["export_path"].endswith("1")


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_rerun_gives_one_run(tmp_path):
    """A kill anywhere (start-up, an epoch, evaluation, export): the rerun completes one run.

    The kill time is drawn at random over a whole run's duration, measured by
    an uninterrupted run with the same flags; the seed is in the message.
    """
    import random

    flags = ("--epochs=2", "--defense=pgd_at")
    started = time.time()
    assert _run(tmp_path / "timing", *flags).returncode == 0
    duration = time.time() - started
    seed = random.randrange(2**31)
    delay = random.Random(seed).uniform(0.0, duration)
    out = tmp_path / "killed"
    process = subprocess.Popen(
        _command(out, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    where = f"killed after {delay:.1f} s of a {duration:.1f} s run (seed {seed})"
    result = _run(out, *flags)
    assert result.returncode == 0, f"{where}: {result.stderr[-3000:]}"
    # A kill between an epoch's log line and its backup reruns that epoch,
    # and its row is logged again (`read_history` keeps the rerun's).
    logged = _epochs_logged(out)
    assert sorted(set(logged)) == [0, 1] and logged == sorted(logged), (where, logged)
    assert len(logged) <= 3, (where, logged)
    assert read_history(str(out / "history.csv"))["epoch"] == [0, 1], where
    assert [n for n in os.listdir(out / "saved_model") if not n.startswith(".")] == ["1"], where
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["export_path"].endswith("1"), where
    assert len(metrics["history"]["loss"]) == 2, where


@pytest.mark.slow
def test_other_flags_never_mix_with_a_run(tmp_path):
    out = tmp_path / "run"
    flags = ("--epochs=1", "--defense=pgd_at")
    assert _run(out, *flags).returncode == 0
    history = (out / "history.csv").read_text()
    metrics = (out / "metrics.json").read_text()

    result = _run(out, "--epochs=1", "--defense=trades", "--learning_rate=0.01")
    assert result.returncode == 1
    assert "--defense" in result.stderr and "--learning_rate" in result.stderr
    assert "new --output_dir" in result.stderr and "Traceback" not in result.stderr
    # The same flags again: the finished run is reported, nothing is redone.
    result = _run(out, *flags)
    assert result.returncode == 0 and "clean accuracy" in result.stdout
    assert (out / "history.csv").read_text() == history
    assert (out / "metrics.json").read_text() == metrics
    assert sorted(os.listdir(out / "saved_model")) == ["1"]


@pytest.mark.slow
def test_one_run_per_output_dir(tmp_path):
    out = tmp_path / "busy"
    process = subprocess.Popen(
        _command(out, "--epochs=3", "--defense=pgd_at"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "run_config.json").exists():
            time.sleep(0.05)
        result = _run(out, "--epochs=3", "--defense=pgd_at")
        assert result.returncode == 1
        assert "in use" in result.stderr and str(process.pid) in result.stderr
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    result = _run(path, "--epochs=1")
    assert result.returncode == 1 and "is a file" in result.stderr


def test_train_examples_above_the_dataset_are_clamped_with_a_warning(caplog):
    from keras_adr import _run_inputs as run_inputs
    from keras_adr import pipeline

    info = data.info("fashion_mnist")
    options = pipeline.TrainOptions(train_examples=10**6, validation_examples=1000)
    with caplog.at_level("WARNING"):
        train_split, _, num_train = run_inputs.splits(options, info)
    assert num_train == info.num_train - 1000
    assert "--train_examples=1000000" in caplog.text and "using all" in caplog.text


@pytest.mark.slow
def test_cifar_pipeline_adapts_the_standardize_layer(tmp_path):
    """The colour builders normalise inside the model with the training data's statistics."""
    import keras
    import numpy as np

    from keras_adr import pipeline, presets

    tfds = pytest.importorskip("tensorflow_datasets")
    options = pipeline.TrainOptions(
        dataset="cifar10",
        model="cifar_cnn",
        epochs=1,
        batch_size=16,
        train_examples=48,
        validation_examples=16,
        test_examples=16,
        eval_attacks=("pgd2", "apgd_ce2"),
        output_dir=str(tmp_path / "run"),
        data_dir=str(tmp_path / "tfds"),
        export=False,
        verbose=0,
    )
    with tfds.testing.mock_data(num_examples=64):
        metrics = pipeline.run(
            options, presets.get("pgd_at", attack_steps=1, attack_epsilon=8 / 255)
        )
        train_images = np.concatenate(
            [
                x
                for x, _ in data.load(
                    "cifar10", "train[:32]", batch_size=32, data_dir=str(tmp_path / "tfds")
                )
            ]
        )
    assert metrics["epochs_run"] == 1
    model = keras.saving.load_model(tmp_path / "run" / "final.keras")
    layer = model.backbone.get_layer("standardize")
    flat = train_images.reshape(-1, 3)
    np.testing.assert_allclose(layer.adapt_mean.numpy(), flat.mean(0), rtol=1e-4)
    np.testing.assert_allclose(layer.std.numpy(), flat.std(0), rtol=1e-3)
