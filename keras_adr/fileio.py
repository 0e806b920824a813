"""Files that are complete or absent: atomic writes, fsync and advisory locks.

Shared by `keras_adr.export` (a SavedModel version appears complete or not
at all) and `keras_adr.rundir` (one process per run directory; state files
never half written).

* **Atomic writes.** A file is written beside its final place, flushed with
  `fsync`, and renamed over it; a rename within one file system is atomic,
  so a reader (or a crash at any moment) sees the old file or the new one.
* **Locks.** Exclusive, non-blocking `flock`s. The kernel drops a lock when
  its process exits, even on `SIGKILL`, so a lock that can be taken belongs
  to no live process. On platforms without `fcntl` no lock is taken
  (`LOCKS_SUPPORTED` is False).
"""

import json
import os
import secrets

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms.
    fcntl = None

LOCKS_SUPPORTED = fcntl is not None


# Atomic writes.


def write_text(path, text):
    """Writes `text` to `path` atomically, creating its directory.

    Args:
        path: The file to write.
        text: Its new contents.

    Returns:
        `path` as a string.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp_path = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    try:
        with open(temp_path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        remove_quietly(temp_path)
        raise
    fsync_dir(directory)
    return path


def write_json(path, payload):
    """Writes `payload` as indented, key-sorted JSON, atomically.

    Args:
        path: The file to write.
        payload: A JSON-serialisable object.

    Returns:
        `path` as a string.
    """
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """The JSON object in `path`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fsync_dir(path):
    """Makes renames and new entries in the directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root):
    """Flushes every file and directory under `root` to disk."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def remove_quietly(path):
    """Removes the file `path` if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# Locks.


def try_lock_file(path):
    """Takes an exclusive lock on the file `path` (created if missing).

    The file records the holder's process id, for `lock_holder`.

    Args:
        path: The lock file.

    Returns:
        A file descriptor that holds the lock (release it with `unlock`), or
        None if another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(path):
    """The process id recorded in the lock file `path`, or `"unknown"`."""
    try:
        with open(path, "rb") as f:
            return f.read(64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def try_lock_dir(path):
    """Takes an exclusive lock on the directory `path`.

    Returns:
        A file descriptor that holds the lock, or None if the directory is
        missing, another process holds the lock, or locks are not supported.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd):
    """Releases a lock from `try_lock_file` or `try_lock_dir` (None: no-op)."""
    if fd is not None:
        os.close(fd)  # Closing the descriptor releases the flock.


def unique_temp_path(parent, prefix):
    """`<parent>/<prefix><pid>-<random>`: a fresh hidden name for a temporary."""
    return os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(8)}")


def make_locked_temp_dir(parent, prefix):
    """Creates and locks a fresh temporary directory in `parent`.

    `os.mkdir` (unlike `tempfile.mkdtemp`, which uses mode 0o700) honours
    the umask, so what is published from it is readable by another user
    (a server).

    Args:
        parent: Where to create it (on the file system of its final place,
            so that publishing it is a rename).
        prefix: Start of its name (see `unique_temp_path`).

    Returns:
        Tuple `(path, lock_fd)`; `lock_fd` is None without lock support.
    """
    while True:
        path = unique_temp_path(parent, prefix)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        if fcntl is None:
            return path, None
        lock_fd = try_lock_dir(path)
        # Between mkdir and flock a concurrent cleanup may have taken the
        # lock or deleted the directory: then start again with a new name.
        if lock_fd is not None and _is_same_dir(path, lock_fd):
            return path, lock_fd
        unlock(lock_fd)


def _is_same_dir(path, fd):
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    fd_stat = os.fstat(fd)
    return (stat.st_dev, stat.st_ino) == (fd_stat.st_dev, fd_stat.st_ino)
