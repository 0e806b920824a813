"""The command-line programs `adr-train`, `adr-evaluate` and `adr-export`.

Each module parses flags into the library's configuration objects and calls
the library; the console scripts (and the scripts in the repository's
`train/` folder) point at their `run` functions. They start quietly:
`keras_adr._startup` sets TensorFlow's C++ log level before TensorFlow is
imported, and `--tf_log_level` (defined here, for all three) restores it.
"""

import sys

from absl import flags

flags.DEFINE_integer(
    "tf_log_level",
    None,
    "TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL): 0 all, 1 no INFO, 2 no WARNING, "
    "3 no ERROR. Default: $TF_CPP_MIN_LOG_LEVEL, else 3 (a quiet start). Read before "
    "TensorFlow is imported.",
)


def keras_verbosity(verbose, stream=None):
    """Keras' `verbose`: `verbose` when given, else 1 on a terminal and 2 (a line per epoch)."""
    if verbose is not None:
        return verbose
    stream = sys.stdout if stream is None else stream
    return 1 if stream.isatty() else 2


def run_program(main, module_name):
    """Runs `main` with absl, listing `module_name`'s flags in `--help`.

    absl's `--help` shows the key flags of the main module, which for a
    console script is the generated wrapper, not the module that defines the
    flags; they are registered for the program's path here.
    """
    from absl import app

    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["tf_log_level"])
    app.run(main)


# TensorFlow's file writers report a full disk as an OpError without errno.
_DISK_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


def is_disk_full(error):
    """Whether `error` (an OSError or a TensorFlow OpError) means no space to write.

    A full disk (ENOSPC), a full quota (EDQUOT) or a file size limit (EFBIG,
    `ulimit -f`); TensorFlow's file writers report these as an `OpError`
    (e.g. `OutOfRangeError`) without an errno, only in the message.
    """
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return any(text in str(error) for text in _DISK_FULL_TEXTS)


def disk_full_message(error, directory, needed_bytes=None):
    """One line: what could not be written, the free space there, and what to do."""
    import os
    import shutil

    path = getattr(error, "filename", None) or directory
    reason = getattr(error, "strerror", None) or next(
        (text for text in _DISK_FULL_TEXTS if text in str(error)), "no space"
    )
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    needed = f"about {needed_bytes / 1e6:,.1f} MB free" if needed_bytes else "more free space"
    return (
        f"cannot write {path!r}: {reason}; {free / 1e6:,.1f} MB are free on its file system "
        f"and this needs {needed} (check also `ulimit -f`); free space and rerun the same "
        "command."
    )


def resume_hint(output_dir):
    """`rerun the same command to resume from epoch N`, N from the run's history.csv."""
    import os

    from keras_adr import pipeline

    done = pipeline.read_history(os.path.join(output_dir, "history.csv")).get("epoch", [])
    return f"rerun the same command to resume from epoch {max(done) + 2 if done else 1}"
