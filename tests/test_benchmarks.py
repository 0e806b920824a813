"""benchmarks.results_io, shared by the benchmark scripts, and how the scripts are run."""

import json
import os
import subprocess
import sys

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
