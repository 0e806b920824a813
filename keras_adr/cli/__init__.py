"""The command-line programs `adr-train`, `adr-evaluate` and `adr-export`.

Each module parses flags into the library's configuration objects and calls
the library; the console scripts (and the scripts in the repository's
`train/` folder) point at their `run` functions.
"""


def run_program(main, module_name):
    """Runs `main` with absl, listing `module_name`'s flags in `--help`.

    absl's `--help` shows the key flags of the main module, which for a
    console script is the generated wrapper, not the module that defines the
    flags; they are registered for the program's path here.
    """
    import sys

    from absl import app, flags

    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
