"""keras_adr.fileio: atomic writes and advisory locks."""

import os
import subprocess
import sys

import pytest

from keras_adr import fileio


def test_write_json_replaces_the_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "state.json"
    assert fileio.write_json(path, {"b": [1, 2], "a": "x"}) == str(path)
    fileio.write_json(path, {"only": True})
    assert path.read_text() == '{\n  "only": true\n}\n'
    assert fileio.read_json(path) == {"only": True}
    with pytest.raises(TypeError):
        fileio.write_json(path, {"bad": object()})
    assert fileio.read_json(path) == {"only": True}  # the old file, untouched
    assert os.listdir(path.parent) == ["state.json"]


def test_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "models.config"
    fileio.write_text(path, "old\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["models.config"]


@pytest.mark.slow
def test_file_lock_is_exclusive_across_processes_and_names_its_holder(tmp_path):
    path = str(tmp_path / ".lock")
    fd = fileio.try_lock_file(path)
    assert fd is not None
    try:
        assert fileio.lock_holder(path) == str(os.getpid())
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from keras_adr import fileio; "
                "print(fileio.try_lock_file(sys.argv[1]))",
                path,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert other.stdout.strip() == "None"
    finally:
        fileio.unlock(fd)
    fd = fileio.try_lock_file(path)  # released: free again
    assert fd is not None
    fileio.unlock(fd)


def test_dir_lock(tmp_path):
    assert fileio.try_lock_dir(str(tmp_path / "missing")) is None
    path, fd = fileio.make_locked_temp_dir(str(tmp_path), ".tmp-x-")
    assert os.path.isdir(path) and os.path.basename(path).startswith(f".tmp-x-{os.getpid()}-")
    try:
        assert fileio.try_lock_dir(path) is None  # flock: per open file, even in one process
    finally:
        fileio.unlock(fd)
    fd = fileio.try_lock_dir(path)
    assert fd is not None
    fileio.unlock(fd)
