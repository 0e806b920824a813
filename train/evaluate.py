"""`adr-evaluate` as a script: `python train/evaluate.py --help` (as the console script)."""

import os

os.environ["KERAS_ADR_PROGRAM"] = "adr-evaluate"  # a quiet start, as the console script has

from keras_adr.cli.evaluate import run  # noqa: E402

if __name__ == "__main__":
    run()
