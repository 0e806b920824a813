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
