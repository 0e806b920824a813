"""User errors of the three programs: one line `program: error: ...`, exit 1, no traceback."""

import os
import subprocess
import sys

import pytest

from keras_adr import ADRConfig, presets

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _program(module, *flags):
    result = subprocess.run(
        [sys.executable, "-m", module, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=_ROOT,
        env=_ENV,
    )
    return result.returncode, result.stderr


def _assert_user_error(code, stderr, program, *needles):
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert f"{program}: error:" in stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr[-2000:])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import keras_adr

    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras_adr.ADRModel(keras_adr.models.small_cnn()).save(path)
    return path


@pytest.mark.slow
def test_adr_export_errors(model_file, tmp_path):
    export_dir = tmp_path / "serving"
    args = [f"--model_path={model_file}", f"--export_dir={export_dir}"]
    code, stderr = _program("keras_adr.cli.export", *args, "--version=1")
    assert code == 0, stderr[-2000:]
    _assert_user_error(
        *_program("keras_adr.cli.export", *args, "--version=1"), "adr-export", "--overwrite"
    )
    _assert_user_error(
        *_program("keras_adr.cli.export", *args, "--version=0"), "adr-export", "--version"
    )
    _assert_user_error(
        *_program("keras_adr.cli.export", *args, "--metadata_json={bad"),
        "adr-export",
        "--metadata_json",
        "JSON",
    )
    _assert_user_error(
        *_program("keras_adr.cli.export", *args, "--metadata_json=[1]"), "adr-export", "JSON object"
    )
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    _assert_user_error(
        *_program(
            "keras_adr.cli.export", f"--model_path={text_file}", f"--export_dir={export_dir}"
        ),
        "adr-export",
        "not a Keras model file",
    )
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(model_file.read_bytes()[:4000])
    _assert_user_error(
        *_program("keras_adr.cli.export", f"--model_path={corrupt}", f"--export_dir={export_dir}"),
        "adr-export",
    )
    _assert_user_error(
        *_program(
            "keras_adr.cli.export",
            f"--model_path={tmp_path / 'missing.keras'}",
            f"--export_dir={export_dir}",
        ),
        "adr-export",
        "does not exist",
    )


@pytest.mark.slow
def test_adr_evaluate_checks_flags_before_evaluating(model_file, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _assert_user_error(
        *_program("keras_adr.cli.evaluate", f"--model_path={model_file}", f"--output_dir={a_file}"),
        "adr-evaluate",
        "--output_dir",
    )
    _assert_user_error(
        *_program("keras_adr.cli.evaluate", f"--model_path={model_file}", "--num_examples=-3"),
        "adr-evaluate",
        "--num_examples",
    )


@pytest.mark.slow
def test_adr_train_names_the_flag(tmp_path):
    _assert_user_error(
        *_program(
            "keras_adr.cli.train",
            f"--output_dir={tmp_path / 'run'}",
            "--lr_decay_fractions=0.5,abc",
        ),
        "adr-train",
        "--lr_decay_fractions",
    )
    _assert_user_error(
        *_program("keras_adr.cli.train", f"--output_dir={tmp_path / 'run'}", "--compilations=0"),
        "adr-train",
        "--compilations",
    )


def test_preset_typos_are_value_errors_listing_fields():
    with pytest.raises(ValueError, match="attack_epsilon"):
        presets.get("adr_pgd", attack_epsilonn=0.3)
    with pytest.raises(ValueError, match="valid fields"):
        ADRConfig().replace(epsilon=0.3)


def test_adr_train_prints_each_error_once(tmp_path):
    code, stderr = _program(
        "keras_adr.cli.train", f"--output_dir={tmp_path / 'run'}", "--compilations=0"
    )
    _assert_user_error(code, stderr, "adr-train", "--compilations")
    assert stderr.count("must be an integer >= 1") == 1, stderr[-2000:]


def test_adr_export_says_why_a_lambda_layer_is_refused(tmp_path):
    import keras

    import keras_adr

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Lambda(lambda t: t * 1.0)(inputs)
    x = keras_adr.layers.Latent()(keras.layers.Flatten()(x))
    model = keras_adr.ADRModel(keras.Model(inputs, keras.layers.Dense(10)(x)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    code, stderr = _program(
        "keras_adr.cli.export", f"--model_path={path}", f"--export_dir={tmp_path / 'serving'}"
    )
    _assert_user_error(code, stderr, "adr-export", "holds a Lambda layer", "safe mode")
    assert "corrupt" not in stderr


@pytest.mark.parametrize(
    "metadata,needle",
    [
        ('{"a": ' + "[" * 30000 + "]" * 30000 + "}", "nested too deeply"),
        ('{"a": "' + "x" * 70000 + '"}', "characters"),
        ('{"a": NaN}', "NaN"),
        ('{"model_name": "mine"}', "reserved"),
    ],
)
def test_adr_export_metadata_errors_come_before_writing(model_file, tmp_path, metadata, needle):
    export_dir = tmp_path / "serving"
    code, stderr = _program(
        "keras_adr.cli.export",
        f"--model_path={model_file}",
        f"--export_dir={export_dir}",
        f"--metadata_json={metadata}",
    )
    _assert_user_error(code, stderr, "adr-export", needle)
    assert not export_dir.exists() or not os.listdir(export_dir), os.listdir(export_dir)


def _limited(file_blocks, module, *flags):
    """`module` run under `ulimit -f file_blocks` (1 KiB blocks): files beyond it fail."""
    import shlex

    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *flags])
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f {file_blocks}; exec {command}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=_ROOT,
        env=dict(_ENV, PYTHONDONTWRITEBYTECODE="1"),
    )
    return result.returncode, result.stderr


def test_adr_export_on_a_full_disk_is_one_line_and_publishes_nothing(model_file, tmp_path):
    export_dir = tmp_path / "serving"
    code, stderr = _limited(
        64, "keras_adr.cli.export", f"--model_path={model_file}", f"--export_dir={export_dir}"
    )
    _assert_user_error(code, stderr, "adr-export", str(export_dir), "MB are free", "needs about")
    assert len([line for line in stderr.splitlines() if "adr-export: error:" in line]) == 1
    assert not [name for name in os.listdir(export_dir) if name.isdigit()]


def test_adr_train_on_a_full_disk_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = _limited(
        64,
        "keras_adr.cli.train",
        f"--output_dir={run_dir}",
        "--epochs=1",
        "--train_examples=96",
        "--validation_examples=32",
        "--test_examples=32",
        "--batch_size=32",
        "--attack_steps=1",
        "--eval_attacks=pgd2,apgd_ce2",
        "--verbose=0",
    )
    if "Dataset 'fashion_mnist' not found" in stderr:
        pytest.skip("Fashion-MNIST is not installed")
    _assert_user_error(code, stderr, "adr-train", str(run_dir), "MB are free", "needs about")
    assert len([line for line in stderr.splitlines() if "adr-train: error:" in line]) == 1


def test_adr_train_interrupted_says_how_to_resume(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keras_adr.cli.train",
            f"--output_dir={run_dir}",
            "--epochs=50",
            "--train_examples=256",
            "--validation_examples=0",
            "--test_examples=32",
            "--batch_size=64",
            "--attack_steps=1",
            "--eval_attacks=pgd2,apgd_ce2",
            "--verbose=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=_ROOT,
        env=_ENV,
        # Ctrl-C's default action, whatever this process inherited: a shell
        # starting a job in the background (`cmd &`) ignores SIGINT for it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    history = run_dir / "history.csv"
    # Interrupted once an epoch is logged: a run with something to resume.
    while process.poll() is None and not (
        history.exists() and len(history.read_text().splitlines()) >= 2
    ):
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    epochs_done = len(history.read_text().splitlines()) - 1
    assert (
        f"adr-train: interrupted; rerun the same command to resume from epoch {epochs_done + 1}"
        in stderr
    ), stderr[-2000:]
