"""A quiet start for the programs `adr-train`, `adr-evaluate` and `adr-export`.

Imported by `keras_adr/__init__.py` before TensorFlow. In a library import it
does nothing. In one of the three programs it sets TensorFlow's C++ log level
(`TF_CPP_MIN_LOG_LEVEL`, default 3 there) and, at level 3, hides what
TensorFlow prints to standard error while it is imported (the absl pre-init
warning, the oneDNN notice, "Could not find cuda drivers"); a failing import
prints it after all. `--tf_log_level=N` or `TF_CPP_MIN_LOG_LEVEL=N` (N < 3)
restores TensorFlow's start-up messages. Only the standard library is used.
"""

import logging
import os
import sys
import tempfile

PROGRAMS = ("adr-train", "adr-evaluate", "adr-export")
# Set by the scripts in the repository's train/ folder (and read once).
PROGRAM_ENV = "KERAS_ADR_PROGRAM"
QUIET_LEVEL = 3


def program_name(argv=None, orig_argv=None, environ=None):
    """The program this process runs (`adr-train`, ...), or None for a library import."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    environ = os.environ if environ is None else environ
    if environ.get(PROGRAM_ENV) in PROGRAMS:
        return environ[PROGRAM_ENV]
    if argv and os.path.basename(argv[0]) in PROGRAMS:
        return os.path.basename(argv[0])
    for flag, module in zip(orig_argv, orig_argv[1:]):
        if flag == "-m" and module.startswith("keras_adr.cli."):
            return "adr-" + module.rsplit(".", 1)[1]
    return None


def tf_log_level(argv, environ):
    """`--tf_log_level` from `argv`, else `TF_CPP_MIN_LOG_LEVEL`, else `QUIET_LEVEL`."""
    for i, arg in enumerate(argv):
        if arg.startswith("--tf_log_level="):
            return arg.split("=", 1)[1]
        if arg == "--tf_log_level" and i + 1 < len(argv):
            return argv[i + 1]
    return environ.get("TF_CPP_MIN_LOG_LEVEL", str(QUIET_LEVEL))


def quiet_tensorflow_if_program():
    """In one of the programs: sets the C++ log level, imports TensorFlow quietly."""
    program = program_name()
    os.environ.pop(PROGRAM_ENV, None)  # not inherited by the processes it starts
    if program is None or "tensorflow" in sys.modules:
        return
    level = tf_log_level(sys.argv, os.environ)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = level
    if level == str(QUIET_LEVEL):
        _import_tensorflow_quietly()
    if level != "0":  # TensorFlow's Python INFO lines (the SavedModel builder's) too
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        logging.getLogger("absl").addFilter(_no_tensorflow_info)


def _no_tensorflow_info(record):
    """False for an INFO (or lower) record that TensorFlow's own code logged through absl."""
    return record.levelno >= logging.WARNING or f"{os.sep}tensorflow{os.sep}" not in record.pathname


def _import_tensorflow_quietly():
    """Imports TensorFlow with standard error (file descriptor 2) set aside."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
