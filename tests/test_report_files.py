"""Evaluation reports are complete sets or absent: kills, full disks, stale sets.

A real `adr-evaluate` on the reference model writes the previous set; later
runs into the same directory are killed between two files (the report's
`KERAS_ADR_REPORT_KILL_AT` hook) or given a file size limit, and the previous
set must be left intact, with the marker that says what it came from.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from keras_adr import evaluation

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODEL = os.path.join(_ROOT, "saved_models", "fashion_mnist_adr")
_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
_FILES = (evaluation.REPORT_JSON, evaluation.REPORT_MARKDOWN, evaluation.REPORT_PLOT)


def _evaluate_command(output_dir, epsilon):
    return [
        sys.executable,
        "-m",
        "keras_adr.cli.evaluate",
        f"--model_path={_MODEL}",
        "--num_examples=32",
        "--batch_size=32",
        "--attacks=pgd5,apgd_ce5",
        f"--epsilon={epsilon}",
        "--allow_sanity_failures",
        f"--output_dir={output_dir}",
    ]


def _run(command, **env):
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=_ROOT,
        env=dict(_ENV, **env),
    )


def _contents(directory):
    return {name: (directory / name).read_bytes() for name in _FILES}


@pytest.fixture(scope="module")
def previous_set(tmp_path_factory):
    """A directory holding a complete report set of epsilon 0.1."""
    if not os.path.isdir(_MODEL):
        pytest.skip(f"the reference model {_MODEL} is missing")
    output_dir = tmp_path_factory.mktemp("previous") / "eval"
    result = _run(_evaluate_command(output_dir, 0.1))
    if "Dataset not found" in result.stderr:
        pytest.skip("Fashion-MNIST is not installed")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture
def output_dir(previous_set, tmp_path):
    path = tmp_path / "eval"
    shutil.copytree(previous_set, path)
    return path


def _assert_previous_set_intact(output_dir, before):
    assert _contents(output_dir) == before
    marker = evaluation.read_report(output_dir)
    assert marker["metadata"]["eval_config"]["epsilon"] == 0.1
    assert "--epsilon=0.1" in marker["metadata"]["command"]


@pytest.mark.parametrize("killed_after", [evaluation.REPORT_JSON, evaluation.REPORT_MARKDOWN])
def test_evaluation_killed_between_report_files_leaves_the_previous_set(output_dir, killed_after):
    before = _contents(output_dir)
    result = _run(
        _evaluate_command(output_dir, 0.05),
        KERAS_ADR_REPORT_KILL_AT=f"wrote:{killed_after}",
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    _assert_previous_set_intact(output_dir, before)
    if killed_after != evaluation.REPORT_JSON:
        return  # the rerun below is the same after either kill

    # The next evaluation removes the killed one's temporary and publishes its set.
    result = _run(_evaluate_command(output_dir, 0.05))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(output_dir)) == sorted([*_FILES, evaluation.REPORT_MARKER])
    marker = evaluation.read_report(output_dir)
    assert marker["metadata"]["eval_config"]["epsilon"] == 0.05


def test_a_publication_killed_midway_is_reported_incomplete(output_dir):
    result = _run(
        _evaluate_command(output_dir, 0.05),
        KERAS_ADR_REPORT_KILL_AT=f"published:{evaluation.REPORT_JSON}",
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    with pytest.raises(evaluation.IncompleteReportError, match="results.complete.json"):
        evaluation.read_report(output_dir)


def test_a_file_size_limit_leaves_the_previous_set_and_says_what_is_needed(output_dir):
    before = _contents(output_dir)
    command = " ".join(f"'{a}'" for a in _evaluate_command(output_dir, 0.05))
    # 2 blocks of 1 KiB: the new results.json (3.5 KB) does not fit.
    result = _run(["bash", "-c", f"ulimit -f 2; exec {command}"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "adr-evaluate: error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(output_dir) in errors[0] and "bytes of free space" in errors[0], errors[0]
    _assert_previous_set_intact(output_dir, before)
    assert not [name for name in os.listdir(output_dir) if name.startswith(".tmp")]
