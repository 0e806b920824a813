"""Result sets published all at once: files with a completion marker, or nothing.

Each writer publishes a *set* of files that is complete or absent:

* The whole set is rendered in memory, written into a hidden, locked
  temporary directory inside the output directory (`.tmp-report-*`) and
  flushed to disk. A kill or a full disk up to here leaves the previous set
  untouched (and its marker with it); the temporary is removed then or by
  the next writer.
* Only then is the set published: the previous set's completion marker is
  removed, each file is renamed over its old version (renames need no free
  space), and the new marker is renamed in last.

The marker (`results.complete.json`, `autoattack.complete.json`) records the
metadata the set came from (for `adr-evaluate`: the command, the model and
the `EvalConfig`) and the SHA-256 of every file. `read_set` checks it: a
set without its marker, or whose files do not match it, is incomplete.
"""

import datetime
import errno
import hashlib
import json
import os
import shutil
import signal

from keras_adr import fileio

TEMP_REPORT_PREFIX = ".tmp-report-"
# Test hook: `KERAS_ADR_REPORT_KILL_AT=wrote:<file>` (the file is in the
# temporary) or `published:<file>` (renamed into place) makes the writer
# SIGKILL itself right after that point, so tests can kill a real process
# between two files.
KILL_AT_ENV = "KERAS_ADR_REPORT_KILL_AT"
# A full disk or a file size limit: the set could not be written.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class ReportWriteError(OSError):
    """The report set could not be written; the previous set is unchanged."""


class IncompleteReportError(ValueError):
    """A report set has no completion marker, or its files do not match it."""


def json_bytes(payload):
    return (json.dumps(payload, indent=2) + "\n").encode("utf-8")


def publish_set(output_dir, files, marker_name, metadata=None):
    """Publishes `files` into `output_dir` as one set with its completion marker.

    Args:
        output_dir: The directory (created if missing).
        files: `{file name: bytes}`, in the order to write them.
        marker_name: File name of the set's completion marker.
        metadata: JSON-serialisable dict the marker records (what the set
            came from).

    Raises:
        ReportWriteError: If the set cannot be written (e.g. a full disk);
            the previous set is unchanged.
    """
    output_dir = os.fspath(output_dir)
    marker = {
        "complete": True,
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metadata": dict(metadata or {}),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in files.items()
        },
    }
    files = {**files, marker_name: json_bytes(marker)}
    needed = sum(len(data) for data in files.values())
    try:
        os.makedirs(output_dir, exist_ok=True)
        _remove_stale_temporaries(output_dir)
        temp_dir, lock_fd = fileio.make_locked_temp_dir(output_dir, TEMP_REPORT_PREFIX)
    except OSError as error:
        raise _write_error(output_dir, needed, error) from None
    try:
        try:
            for name, data in files.items():
                with open(os.path.join(temp_dir, name), "wb") as f:
                    f.write(data)
                _test_hook(f"wrote:{name}")
            fileio.fsync_tree(temp_dir)
        except OSError as error:
            raise _write_error(output_dir, needed, error) from None
        # From here on only renames: the previous marker goes first, so that a
        # kill in between leaves a set that `read_report` calls incomplete.
        fileio.remove_quietly(os.path.join(output_dir, marker_name))
        for name in files:
            os.replace(os.path.join(temp_dir, name), os.path.join(output_dir, name))
            _test_hook(f"published:{name}")
        fileio.fsync_dir(output_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        fileio.unlock(lock_fd)


def _write_error(output_dir, needed, error):
    if error.errno in _NO_SPACE_ERRNOS:
        return ReportWriteError(
            error.errno,
            f"cannot write the evaluation report to {output_dir!r}: {error.strerror}; it "
            f"needs {needed:,} bytes of free space (and a file size limit above that). "
            "The previous report there is unchanged.",
        )
    return ReportWriteError(
        error.errno,
        f"cannot write the evaluation report to {output_dir!r}: {error.strerror} "
        f"({error.filename or output_dir}). The previous report there is unchanged.",
    )


def _remove_stale_temporaries(output_dir):
    """Removes `.tmp-report-*` directories of writers that died (their lock is free)."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if not name.startswith(TEMP_REPORT_PREFIX) or not os.path.isdir(path):
            continue
        lock_fd = fileio.try_lock_dir(path)
        if lock_fd is not None or not fileio.LOCKS_SUPPORTED:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                fileio.unlock(lock_fd)


def _test_hook(event):
    if os.environ.get(KILL_AT_ENV) == event:
        os.kill(os.getpid(), signal.SIGKILL)


def read_set(output_dir, marker_name):
    """The completion marker of the report set in `output_dir`, after checking the set.

    Args:
        output_dir: A directory written by `publish_set`.
        marker_name: The set's marker file name.

    Returns:
        The marker: `{"complete": True, "metadata": ..., "files": ...}`;
        `metadata` tells what the set came from (for `adr-evaluate`, its
        command and `EvalConfig`).

    Raises:
        IncompleteReportError: If the marker is missing (no set, or a set
            whose publication was interrupted) or a file does not match it.
    """
    path = os.path.join(os.fspath(output_dir), marker_name)
    try:
        marker = fileio.read_json(path)
    except FileNotFoundError:
        raise IncompleteReportError(
            f"{output_dir!r} holds no complete result set: {marker_name} is missing (no report "
            "was written, or writing one was interrupted); rerun the evaluation."
        ) from None
    for name, expected in marker["files"].items():
        try:
            with open(os.path.join(output_dir, name), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            digest = None
        if digest != expected["sha256"]:
            raise IncompleteReportError(
                f"{os.path.join(output_dir, name)!r} does not belong to the report set its "
                f"{marker_name} records (a later writer was interrupted); rerun the evaluation."
            )
    return marker
