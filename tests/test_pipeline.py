"""keras_adr.pipeline: what a run prints besides its progress."""

import warnings

import pytest

from keras_adr import data, pipeline, presets


@pytest.fixture(scope="module", autouse=True)
def _needs_fashion_mnist():
    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


def test_run_emits_no_keras_shuffle_warning(tmp_path):
    # The training dataset shuffles itself; `fit(shuffle=True)` (Keras'
    # default) on a tf.data.Dataset only warns that it is ignored.
    options = pipeline.TrainOptions(
        train_examples=128,
        validation_examples=64,
        test_examples=32,
        batch_size=64,
        eval_attacks=("pgd3", "apgd_ce5"),
        output_dir=str(tmp_path),
        strategy="default",
        export=False,
        verbose=0,
    )
    config = presets.get("pgd_at", attack_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = pipeline.run(options, config)
    assert metrics["epochs_run"] == 1  # fit did run
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "shuffle" in m], messages
