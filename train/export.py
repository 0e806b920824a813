"""`adr-export` as a script: `python train/export.py --help` (the same as the console script)."""

from keras_adr.cli.export import run

if __name__ == "__main__":
    run()
