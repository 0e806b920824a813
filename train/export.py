"""`adr-export` as a script: `python train/export.py --help` (the same as the console script)."""

import os

os.environ["KERAS_ADR_PROGRAM"] = "adr-export"  # a quiet start, as the console script has

from keras_adr.cli.export import run  # noqa: E402

if __name__ == "__main__":
    run()
