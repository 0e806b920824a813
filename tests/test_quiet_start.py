"""The programs start quietly: no TensorFlow start-up lines, one line per epoch off a terminal."""

import io
import os
import re
import shutil
import subprocess
import sys

import pytest

from keras_adr import _startup, cli

# What TensorFlow prints at start-up on a CPU machine (C++ and Python).
_START_UP = re.compile(
    r"cuda|cuInit|oneDNN custom operations|absl::InitializeLog|cpu_feature_guard"
    r"|Assets written|SavedModel|signature_serialization|functional_saver|fingerprint",
    re.IGNORECASE,
)


def _program(name):
    """The console script when it is installed, else the module (detected alike)."""
    script = shutil.which(name)
    if script:
        return [script]
    return [sys.executable, "-m", f"keras_adr.cli.{name.split('-')[1]}"]


def _environment():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return dict(env, CUDA_VISIBLE_DEVICES="")


def test_program_name():
    assert _startup.program_name(["/usr/bin/adr-train"], [], {}) == "adr-train"
    assert _startup.program_name(["-m"], ["python", "-m", "keras_adr.cli.evaluate"], {}) == (
        "adr-evaluate"
    )
    assert _startup.program_name(["train.py"], [], {"KERAS_ADR_PROGRAM": "adr-export"}) == (
        "adr-export"
    )
    # A library import, a test run, a script of the user's: nothing is changed.
    assert _startup.program_name(["pytest"], ["python", "-m", "pytest"], {}) is None
    assert _startup.program_name(["my_train.py"], ["python", "my_train.py"], {}) is None


def test_tf_log_level_from_flag_then_environment():
    assert _startup.tf_log_level(["adr-train"], {}) == "3"
    assert _startup.tf_log_level(["adr-train"], {"TF_CPP_MIN_LOG_LEVEL": "1"}) == "1"
    env = {"TF_CPP_MIN_LOG_LEVEL": "1"}
    assert _startup.tf_log_level(["adr-train", "--tf_log_level=0"], env) == "0"
    assert _startup.tf_log_level(["adr-train", "--tf_log_level", "2"], env) == "2"


def test_keras_verbosity_follows_the_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert cli.keras_verbosity(None, Terminal()) == 1
    assert cli.keras_verbosity(None, io.StringIO()) == 2  # a file or a pipe: one line per epoch
    assert cli.keras_verbosity(0, Terminal()) == 0 and cli.keras_verbosity(1, io.StringIO()) == 1


@pytest.mark.slow
def test_adr_train_log_is_short_and_quiet(tmp_path):
    """`adr-train ... > log 2>&1`: under 50 lines and 10 kB, no TensorFlow start-up line."""
    log = tmp_path / "log"
    with open(log, "wb") as out:
        result = subprocess.run(
            [
                *_program("adr-train"),
                "--epochs=1",  # one line per epoch: the default 10 only add 9 lines
                "--train_examples=2048",
                "--test_examples=128",
                f"--output_dir={tmp_path / 'x'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_environment(),
            cwd=tmp_path,
            timeout=600,
        )
    data = log.read_bytes()
    text = data.decode(errors="replace")
    assert result.returncode == 0, text[-3000:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").splitlines()
    assert len(lines) < 50 and len(data) < 10_000, text
    assert not [line for line in lines if _START_UP.search(line)], text
    assert "robust accuracy:" in text and "exported to" in text  # the summary
    assert len([line for line in lines if line.startswith("1/1 - ")]) == 1  # one line per epoch


@pytest.mark.slow
def test_tf_log_level_restores_the_start_up_messages():
    quiet = subprocess.run(
        [*_program("adr-export"), "--helpshort"],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=300,
    )
    loud = subprocess.run(
        [*_program("adr-export"), "--helpshort", "--tf_log_level=0"],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=300,
    )
    assert "--model_path" in quiet.stdout + quiet.stderr
    assert not _START_UP.search(quiet.stderr), quiet.stderr
    assert _START_UP.search(loud.stderr), loud.stderr
