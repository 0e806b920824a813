"""keras_adr.rundir: one process and one configuration per run directory."""

import os

import pytest

from keras_adr import fileio, rundir


def test_second_user_is_refused_with_the_holders_process_id(tmp_path):
    config = {"options": {"epochs": 1}}
    with rundir.RunDirectory(tmp_path, config) as first:
        first.update(trained=True)
        with pytest.raises(rundir.RunDirectoryError, match=f"in use.*process {os.getpid()}"):
            rundir.RunDirectory(tmp_path, config).__enter__()
    with rundir.RunDirectory(tmp_path, config) as again:  # released on exit
        assert again.state == {"trained": True}
    assert fileio.read_json(tmp_path / rundir.CONFIG_FILE) == config


def test_other_configuration_is_refused_naming_the_flag(tmp_path):
    with rundir.RunDirectory(tmp_path, {"options": {"epochs": 1}}):
        pass
    with pytest.raises(rundir.RunDirectoryError, match="--epochs: 1 -> 2"):
        rundir.RunDirectory(tmp_path, {"options": {"epochs": 2}}).__enter__()
