"""`adr-evaluate` as a script: `python train/evaluate.py --help` (same as the console script)."""

from keras_adr.cli.evaluate import run

if __name__ == "__main__":
    run()
