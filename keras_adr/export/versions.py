"""The version directories under a model's base path: listing them, and publishing one atomically.

TF Serving serves each child of the base path whose name parses as an
integer as one version. A version is built in a hidden, `flock`ed temporary
directory (`.tmp-export-<version>-...`) and `publish()` renames it into
place only when it is complete; a version replaced with `overwrite=True` is
first moved aside (`.tmp-replaced-<version>-...`). `cleanup_stale_temporaries()`
removes the temporaries of exporters that died and restores a version whose
replacement never arrived, so a reader, or a crash at any moment, sees
either no new version or a complete one.
"""

import errno
import os
import shutil

from keras_adr import fileio

TEMP_EXPORT_PREFIX = ".tmp-export-"
TEMP_REPLACED_PREFIX = ".tmp-replaced-"


def cleanup_stale_temporaries(base_dir):
    """Removes temporaries left in `base_dir` by exports that died.

    Each temporary directory is `flock`ed by its exporting process for its
    whole life, and the kernel drops the lock when that process exits, even
    on `SIGKILL`. A temporary whose lock can be taken therefore belongs to
    no live export. Stale `.tmp-export-*` directories are deleted. A stale
    `.tmp-replaced-<version>-*` directory (a version moved aside by an
    `overwrite=True` export) is renamed back to `<version>` if that version is
    missing, since its replacement never arrived, and deleted otherwise.

    Exports in progress in other processes are left alone. `export_saved_model`
    calls this at its start. On platforms without `fcntl` nothing is
    considered stale.

    Args:
        base_dir: The model's base path.

    Returns:
        List of the paths that were removed or restored.
    """
    base_dir = os.fspath(base_dir)
    if not fileio.LOCKS_SUPPORTED or not os.path.isdir(base_dir):
        return []
    handled = []
    for name in sorted(os.listdir(base_dir)):
        if not name.startswith((TEMP_EXPORT_PREFIX, TEMP_REPLACED_PREFIX)):
            continue
        path = os.path.join(base_dir, name)
        lock_fd = fileio.try_lock_dir(path)
        if lock_fd is None:
            continue  # Still in use, or already gone.
        try:
            restored = _restore_replaced(base_dir, name)
            if not restored:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
        finally:
            fileio.unlock(lock_fd)
    if handled:
        fileio.fsync_dir(base_dir)
    return handled


def list_versions(base_dir):
    """Returns the sorted integer versions present in `base_dir`.

    Args:
        base_dir: The model's base path.

    Returns:
        Sorted list of ints; empty if `base_dir` does not exist.
    """
    return sorted(existing_versions(os.fspath(base_dir)))


def existing_versions(base_dir):
    """Maps each version in `base_dir` to its directory name.

    Args:
        base_dir: The model's base path, a string.

    Returns:
        Dict from int version to directory name; empty if `base_dir` does
        not exist.
    """
    if not os.path.isdir(base_dir):
        return {}
    versions = {}
    for name in os.listdir(base_dir):
        # TF Serving parses names as int64, so "007" would be version 7.
        if name.isascii() and name.isdigit():
            if os.path.isdir(os.path.join(base_dir, name)):
                versions[int(name)] = name
    return versions


def next_version(base_dir):
    """Returns one more than the largest version in `base_dir` (1 if none)."""
    return max(existing_versions(base_dir), default=0) + 1


def check_version_free(base_dir, version):
    """Raises FileExistsError if `version` already exists in `base_dir`."""
    existing = existing_versions(base_dir)
    if version in existing:
        raise FileExistsError(
            errno.EEXIST,
            f"Version {version} already exists; pass overwrite=True to replace it",
            os.path.join(base_dir, existing[version]),
        )


def publish(temp_dir, base_dir, version, *, overwrite):
    """Renames a complete temporary directory into its version's place.

    Args:
        temp_dir: The complete, flushed SavedModel directory.
        base_dir: The model's base path.
        version: The requested version, or None for the next free one.
        overwrite: Whether to replace an existing version.

    Returns:
        The path of the version directory.

    Raises:
        FileExistsError: If the version exists and `overwrite` is False.
    """
    if version is None:
        # Chosen now rather than at the start so that a concurrent export
        # that finished meanwhile is not clobbered.
        version = next_version(base_dir)
    existing = existing_versions(base_dir)
    target = os.path.join(base_dir, str(version))
    if version not in existing:
        os.rename(temp_dir, target)
        fileio.fsync_dir(base_dir)
        return target
    if not overwrite:
        check_version_free(base_dir, version)
    old = os.path.join(base_dir, existing[version])
    # Locked before the move so that a concurrent cleanup cannot mistake it
    # for a stale leftover while it is in its temporary place.
    old_lock = fileio.try_lock_dir(old)
    try:
        aside = fileio.unique_temp_path(base_dir, f"{TEMP_REPLACED_PREFIX}{version}-")
        os.rename(old, aside)
        # A crash between these renames leaves no version; the next cleanup
        # renames `aside` back.
        try:
            os.rename(temp_dir, target)
        except OSError:
            os.rename(aside, old)
            raise
        fileio.fsync_dir(base_dir)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        fileio.unlock(old_lock)
    return target


def _restore_replaced(base_dir, name):
    """Renames a stale moved-aside version back if nothing replaced it."""
    if not name.startswith(TEMP_REPLACED_PREFIX):
        return False
    version_text = name[len(TEMP_REPLACED_PREFIX) :].split("-", 1)[0]
    if not version_text.isdigit():
        return False
    if int(version_text) in existing_versions(base_dir):
        return False
    os.rename(os.path.join(base_dir, name), os.path.join(base_dir, version_text))
    return True
