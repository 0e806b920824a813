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
