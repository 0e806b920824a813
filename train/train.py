"""`adr-train` as a script: `python train/train.py --help` (the same as the console script)."""

from keras_adr.cli.train import run

if __name__ == "__main__":
    run()
