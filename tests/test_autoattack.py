"""Tests for keras_adr.evaluation.autoattack (the AutoAttack suite, RobustBench-format results)."""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import blob_data, tiny_cnn

from keras_adr import attacks, evaluation

_FAST = dict(steps=10, queries=60, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def four_classes():
    """The tiny CNN trained on 4-class blobs (APGD-T's targeted DLR needs 4 classes)."""
    keras.utils.set_random_seed(0)
    x, y = blob_data(384, num_classes=4)
    model = tiny_cnn(num_classes=4)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    return model, x[:24], y[:24]


def test_robustbench_eps_is_written_as_robustbench_writes_it():
    assert evaluation.robustbench_eps(8 / 255) == "8/255"
    assert evaluation.robustbench_eps(4 / 255) == "4/255"
    assert evaluation.robustbench_eps(0.1) == "0.1"
    assert evaluation.robustbench_eps(0.3) == "0.3"
    assert evaluation.robustbench_eps(0.5) == "0.5"


@pytest.mark.slow
def test_standard_suite_runs_in_order_on_robust_points_and_is_never_weaker(four_classes, tmp_path):
    model, x, y = four_classes
    epsilon = 0.25
    result = evaluation.autoattack(model, x, y, epsilon=epsilon, seed=0, **_FAST)
    assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    after = [result.accuracy_after[a] for a in result.attacks]
    assert after == sorted(after, reverse=True) and after[-1] == result.robust_accuracy
    assert result.robust_accuracy < result.clean_accuracy  # The attacks do something here.
    # Per example: robust <=> correct clean and broken by nothing; broken points fool the
    # model inside the ball.
    assert np.array_equal(result.robust_correct, result.broken_by == "")
    assert np.array_equal(~result.clean_correct, result.broken_by == "clean")
    broken = ~result.robust_correct & result.clean_correct
    predictions = np.argmax(model(result.x_adv, training=False), -1)
    assert np.all(predictions[broken] != y[broken])
    assert np.abs(result.x_adv - x).max() <= epsilon + 1e-6
    np.testing.assert_array_equal(result.x_adv[~broken], x[~broken])
    # Never weaker than any one of its attacks run alone (up to one example of randomness).
    for name in result.attacks:
        alone = evaluation.autoattack(
            model, x, y, epsilon=epsilon, version="custom", attacks=[name], seed=0, **_FAST
        )
        assert result.robust_accuracy <= alone.robust_accuracy + 1 / len(x)
    path = evaluation.write_autoattack_result(
        result, tmp_path, name="tiny", defense="standard", dataset="blobs"
    )
    card = json.loads(open(path).read())
    assert card["autoattack_acc"] == f"{100 * result.robust_accuracy:.2f}"
    assert card["clean_acc"] == f"{100 * result.clean_accuracy:.2f}"
    assert card["eps"] == "0.25" and card["norm"] == "Linf" and card["n_examples"] == 24
    assert len(card["keras_adr"]["broken_by"]) == 24


@pytest.mark.slow
def test_l2_standard_suite_runs_fab_t_and_rand_suite_averages_20_gradients(
    four_classes, monkeypatch
):
    model, x, y = four_classes
    calls = []
    apgd = attacks.apgd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("eot_iterations", 1))
        return apgd(*args, **kwargs)

    monkeypatch.setattr(attacks, "apgd", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l2 = evaluation.autoattack(model, x, y, epsilon=1.0, norm="l2", seed=0, **_FAST)
        assert calls == [1, 1]  # APGD-CE and APGD-T, one gradient per step.
        rand = evaluation.autoattack(model, x, y, epsilon=0.25, version="rand", seed=0, **_FAST)
    assert not [w for w in caught if "FAB" in str(w.message) or "EOT" in str(w.message)]
    assert l2.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert l2.robust_accuracy < l2.clean_accuracy
    sizes = np.linalg.norm((l2.x_adv - x).reshape(len(x), -1), axis=1)
    assert sizes.max() <= 1.0 * (1 + 1e-5) and l2.x_adv.min() >= 0 and l2.x_adv.max() <= 1
    assert rand.attacks == ("apgd-ce", "apgd-dlr") and calls[2:] == [20, 20]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(version="plus"), "version"),
        (dict(attacks=["square"]), "custom"),
        (dict(version="custom", attacks=["apgd-xx"]), "Unknown"),
        (dict(version="custom", attacks=[]), "attacks"),
        (dict(version="custom", attacks=["square", "square"]), "duplicate"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(norm="l1"), "norm"),
        (dict(queries=0), "queries"),
        (dict(seed=0.5), "seed"),
        (dict(), "at least 4"),  # APGD-T on a 3-class model.
    ],
)
def test_autoattack_rejects_bad_arguments(trained_tiny, kwargs, match):
    model, x, y = trained_tiny
    args = {"epsilon": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluation.autoattack(model, x[:4], y[:4], **args)


def _gradient_blocked(model):
    """`model` with the same outputs and an exactly zero input gradient (masked gradients)."""

    @tf.custom_gradient
    def blocked(images):
        return tf.identity(images), lambda upstream: tf.zeros_like(upstream)

    return lambda images: model(blocked(images), training=False)


def test_autoattack_checks_join_the_sanity_checks(trained_tiny, tmp_path):
    model, x, y = trained_tiny
    # Square after APGD-CE; epsilon 0.3 erases the class patch, so Square finds what APGD-CE,
    # blind without a gradient, cannot.
    args = dict(epsilon=0.3, version="custom", attacks=["apgd-ce", "square"], seed=0)
    args.update(_FAST, queries=200)
    masked = evaluation.autoattack(_gradient_blocked(model), x[:24], y[:24], **args)
    assert masked.checks["zero_gradient_fraction"] == 1.0
    assert masked.checks["zero_gradient_examples"] == 16
    checks = evaluation.sanity_checks(masked)
    status = {c.name: c.status for c in checks}
    assert status["no_zero_input_gradients"] == "failed"
    assert masked.checks["square_after_white_box"] == np.sum(masked.broken_by == "square") > 1
    assert status["square_not_stronger_than_white_box"] == "failed"
    with pytest.raises(evaluation.SanityCheckError, match="no_zero_input_gradients"):
        evaluation.sanity_checks(masked, raise_on_failure=True)
    summary = evaluation.format_summary(masked, checks)
    assert "[FAIL] no_zero_input_gradients" in summary and "SANITY CHECKS FAILED" in summary
    path = evaluation.write_autoattack_result(masked, tmp_path, checks=checks, name="masked")
    written = json.loads(open(path).read())["keras_adr"]
    assert written["sanity_checks_passed"] is False
    assert [c["name"] for c in written["sanity_checks"]] == [c.name for c in checks]

    # The same model with its gradients: no zero gradient; Square alone is not checked.
    plain = evaluation.autoattack(
        model, x[:24], y[:24], **{**args, "attacks": ["square"], "queries": 20}
    )
    status = {c.name: c.status for c in evaluation.sanity_checks(plain)}
    assert status == {
        "no_zero_input_gradients": "passed",
        "square_not_stronger_than_white_box": "skipped",
    }
