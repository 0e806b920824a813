"""keras_adr.pipeline: what a run prints besides its progress."""

import warnings

import pytest
import tensorflow as tf

from keras_adr import callbacks, data, distribute, pipeline, presets


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist():
    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


def _quick_options(tmp_path, **fields):
    """A run on one device, without export or progress bar, into `tmp_path`."""
    return pipeline.TrainOptions(
        output_dir=str(tmp_path), strategy="default", export=False, verbose=0, **fields
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
