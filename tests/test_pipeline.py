"""keras_adr.pipeline: what a run prints besides its progress."""

import os
import struct
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import callbacks, data, distribute, pipeline, presets

_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist():
    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


def _quick_options(tmp_path, **fields):
    """A run on one device, without export or progress bar, into `tmp_path`."""
    return pipeline.TrainOptions(
        **{"epochs": 1, **fields},
        output_dir=str(tmp_path),
        strategy="default",
        export=False,
        verbose=0,
    )


@pytest.mark.slow
def test_run_emits_no_keras_shuffle_warning(tmp_path):
    # The training dataset shuffles itself; `fit(shuffle=True)` (Keras'
    # default) on a tf.data.Dataset only warns that it is ignored.
    options = _quick_options(
        tmp_path,
        train_examples=128,
        validation_examples=64,
        test_examples=32,
        batch_size=64,
        eval_attacks=("pgd3", "apgd_ce5"),
    )
    config = presets.get("pgd_at", attack_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = pipeline.run(options, config)
    assert metrics["epochs_run"] == 1  # fit did run
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "shuffle" in m], messages


def test_compilations_need_a_single_worker(monkeypatch):
    strategy = tf.distribute.get_strategy()
    three = pipeline.TrainOptions(compilations=3)
    assert pipeline.TrainOptions().compilations == 1
    assert pipeline._compilations(three, strategy) == 3
    monkeypatch.setattr(distribute, "num_workers", lambda strategy: 2)
    assert pipeline._compilations(pipeline.TrainOptions(), strategy) == 1
    with pytest.raises(ValueError, match="--compilations=3 needs a single worker"):
        pipeline._compilations(three, strategy)
    with pytest.raises(ValueError, match=r"`compilations` \(--compilations\) must be"):
        pipeline.TrainOptions(compilations=0)


@pytest.mark.slow
def test_run_records_the_compilations_it_timed(tmp_path):
    steps = 2 * (callbacks.DEFAULT_WARMUP_STEPS + callbacks.DEFAULT_TIMED_STEPS) + 2
    options = _quick_options(
        tmp_path,
        train_examples=8 * steps,
        validation_examples=0,
        test_examples=16,
        batch_size=8,
        eval_attacks=("pgd2", "apgd_ce2"),
        compilations=2,
    )
    metrics = pipeline.run(options, presets.get("pgd_at", attack_steps=1))
    timed = metrics["compilations"]
    assert len(timed["step_seconds"]) == 2 and all(t > 0 for t in timed["step_seconds"])
    assert timed["step_seconds"][timed["kept"]] == min(timed["step_seconds"])


def _idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _data_dir_with_train_only(tmp_path):
    if not os.path.isdir(_FASHION_MNIST_DIR):
        pytest.skip(f"needs the Fashion-MNIST IDX files in {_FASHION_MNIST_DIR}")
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (directory / name).symlink_to(os.path.join(_FASHION_MNIST_DIR, name))
    return directory


@pytest.mark.parametrize("test_files", ["missing", "32x32"])
def test_test_split_is_checked_before_training(tmp_path, test_files):
    data_dir = _data_dir_with_train_only(tmp_path)
    if test_files == "32x32":
        (data_dir / "t10k-images-idx3-ubyte").write_bytes(
            _idx_bytes(np.zeros((8, 32, 32), np.uint8))
        )
        (data_dir / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(8, np.uint8)))
    options = _quick_options(
        tmp_path / "run",
        data_dir=str(data_dir),
        train_examples=64,
        validation_examples=0,
        batch_size=32,
        eval_attacks=("pgd2", "apgd_ce2"),
    )
    error = data.DatasetNotFoundError if test_files == "missing" else ValueError
    match = "not found" if test_files == "missing" else r"test images .* \(32, 32, 1\)"
    with pytest.raises(error, match=match):
        pipeline.run(options, presets.get("pgd_at", attack_steps=1))
    assert not (tmp_path / "run" / "history.csv").exists()  # no epoch ran
