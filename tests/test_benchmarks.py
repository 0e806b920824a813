"""benchmarks.results_io, shared by the benchmark scripts, and how the scripts are run."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import results_io

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_keep_their_file_format(tmp_path):
    # Finished benchmark rows must stay byte-compatible: sorted keys, indent 2, newline.
    payload = {"b": 1, "a": {"y": [1.5, None], "x": "s"}}
    path = tmp_path / "row.json"
    results_io.write_json_atomic(path, payload)
    assert path.read_text() == json.dumps(payload, indent=2, sort_keys=True) + "\n"
    assert results_io.read_json(path) == payload
    assert results_io.read_json(tmp_path / "missing.json") is None


def test_write_results_writes_json_and_markdown(tmp_path):
    path = tmp_path / "out" / "speed.json"
    results_io.write_results(str(path), {"b": 2, "a": object}, markdown="# Speed\n")
    assert list(json.loads(path.read_text())) == ["b", "a"]  # insertion order kept
    assert json.loads(path.read_text())["a"] == str(object)
    assert (tmp_path / "out" / "speed.md").read_text() == "# Speed\n"


def test_markdown_table():
    assert results_io.markdown_table(
        ["name", "s", "note"], [["a", 1.5, ""], ["b", 2, "x"]], align="lrl"
    ) == ["| name | s | note |", "|---|---:|---|", "| a | 1.5 |  |", "| b | 2 | x |"]
    assert results_io.markdown_table(["a", "b"], [])[1] == "|---|---:|"


def test_machine_info_names_the_cpu_and_versions():
    import keras
    import tensorflow as tf

    info = results_io.machine_info(load=[0.5])
    assert info["cpu"] == results_io.cpu_info()[0] and info["cpu"]
    assert info["cpus"] == os.cpu_count() and info["load"] == [0.5]
    assert (info["tensorflow"], info["keras"]) == (tf.__version__, keras.__version__)


def test_scripts_run_as_modules_and_as_files(tmp_path):
    for command in (["-m", "benchmarks.robustness"], [os.path.join("benchmarks", "robustness.py")]):
        result = subprocess.run(
            [sys.executable, *command, "--preset=cpu", "--list", f"--results_dir={tmp_path}"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "pgd_at" in result.stdout and "pending" in result.stdout


def _robustness(*flags, timeout=120):
    """Runs benchmarks/robustness.py with `flags`; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.robustness", *flags],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_precision_axis_keeps_the_finished_fmnist_rows(tmp_path):
    # Rows of float32-only presets keep their names and fingerprints: the
    # committed fmnist rows are still done.
    status = {
        line.split()[0]: line.split()[4]
        for line in _robustness("--preset=fmnist", "--list").splitlines()
    }
    for name in ("pgd_at", "adr_pgd", "pgd_at_seed1", "adr_pgd_seed1"):
        assert status[name] == "done", name
    listed = _robustness("--preset=precision", "--list", f"--results_dir={tmp_path}")
    names = [line.split()[0] for line in listed.splitlines()]
    assert names == [
        f"{row}_{p}"
        for row in ("pgd_at", "adr_pgd", "pgd_at_seed1", "adr_pgd_seed1")
        for p in ("float32", "mixed_bfloat16")
    ]


def test_precision_preset_trains_each_precision_and_compares_them(tmp_path):
    import keras

    from keras_adr import data, precision

    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    rows = ("pgd_at_float32", "pgd_at_mixed_bfloat16")
    _robustness(
        "--preset=precision",
        f"--results_dir={tmp_path / 'results'}",
        f"--workdir={tmp_path / 'runs'}",
        "--train_examples=320",
        "--validation_examples=64",
        "--test_examples=32",
        "--restarts=1",
        "--eval_attacks=pgd5,apgd_ce5",
        f"--rows={','.join(rows)}",
        "--threads=1",
        "--verbose=0",
        timeout=300,
    )
    for name, policy, dtype in zip(rows, ("float32", "mixed_bfloat16"), ("float32", "bfloat16")):
        row = json.loads((tmp_path / "results" / "precision_rows" / f"{name}.json").read_text())
        assert row["precision"] == row["precision_record"]["training"] == policy
        assert row["evaluation_precision"] == "float32"
        model = keras.models.load_model(tmp_path / "runs" / name / "best.keras", compile=False)
        assert precision.compute_dtype(model.backbone) == dtype  # trained in the policy
    summary = json.loads((tmp_path / "results" / "precision.json").read_text())
    pair = summary["precision_comparison"]["comparisons"]["mixed_bfloat16"]["pgd_at"]
    assert [e["seed"] for e in pair["seeds"]] == pair["mean"]["seeds"] == [0]
    robust = pair["mean"]["robust_accuracy"]
    assert robust["difference"] == robust["mixed_bfloat16"] - robust["float32"]
    assert set(pair["mean"]["paired"]) == {"clean", "worst case"}
    assert "## Training precision: mixed_bfloat16 against float32" in (
        (tmp_path / "results" / "precision.md").read_text()
    )
