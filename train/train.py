"""`adr-train` as a script: `python train/train.py --help` (the same as the console script)."""

import os

os.environ["KERAS_ADR_PROGRAM"] = "adr-train"  # a quiet start, as the console script has

from keras_adr.cli.train import run  # noqa: E402

if __name__ == "__main__":
    run()
