"""Tests for keras_adr.evaluation and the adr-evaluate program (keras_adr/cli/evaluate.py)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fashion_arrays

from keras_adr import attacks, evaluation

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_NUM_EXAMPLES = 100
# Short attacks keep the suite fast; the structure is the default suite's.
_FAST_ATTACKS = ("fgsm", "pgd10", "pgd20", "apgd_ce20", "apgd_dlr_t20")


class Binarize(keras.layers.Layer):
    """Rounds pixels to {0, 1} with a zero input gradient: deliberate gradient masking."""

    def call(self, images):
        return images * 0.0 + tf.stop_gradient(tf.round(images))


def _dense_model(masked=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((28, 28, 1), name="images")]
    if masked:
        layers.append(Binarize())
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ]
    model = keras.Sequential(layers)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def fashion():
    return fashion_arrays(1500, _NUM_EXAMPLES)


@pytest.fixture(scope="module")
def normal_model(fashion):
    (x_train, y_train), _ = fashion
    model = _dense_model()
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def masked_model(fashion):
    (x_train, y_train), _ = fashion
    model = _dense_model(masked=True)
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    return model


# --- Worst case per example --------------------------------------------------


def test_worst_case_is_per_example_not_the_min_of_accuracies():
    clean = np.array([True, True, True, True, True])
    attack_a = np.array([False, False, True, True, True])  # Fools {0, 1}: accuracy 60%.
    attack_b = np.array([True, True, False, True, True])  # Fools {2}: accuracy 80%.
    robust = evaluation.worst_case_correct(clean, {"a": attack_a, "b": attack_b})
    np.testing.assert_array_equal(robust, [False, False, False, True, True])
    assert robust.mean() == pytest.approx(0.4)  # Not min(0.6, 0.8).
    # Restarts as [R, N]: robust only if every restart fails.
    restarts = np.array([[True, True, False], [True, False, True]])
    np.testing.assert_array_equal(evaluation.worst_case_correct(restarts), [True, False, False])
    with pytest.raises(ValueError, match="same examples"):
        evaluation.worst_case_correct(clean, attack_a[:3])
    with pytest.raises(ValueError, match="boolean"):
        evaluation.worst_case_correct(np.ones(3))


def test_evaluate_combines_attacks_per_example(monkeypatch):
    fooled_by = {"pgd20": [0, 1], "apgd_ce": [2]}

    def fake_attack_fn(model_fn, spec, **kwargs):
        def correct(x, y, seed):
            index = tf.range(tf.shape(x)[0])
            return tf.reduce_all(
                index[:, None] != tf.constant(fooled_by[spec.name] + [-1])[None], axis=1
            )

        return correct

    # The suite module's function: evaluate_robustness looks it up there.
    monkeypatch.setattr(evaluation.suite, "_attack_fn", fake_attack_fn)
    x = np.full((5, 2, 2, 1), 0.5, np.float32)
    y = np.zeros(5, np.int32)
    model = lambda images: tf.tile(tf.constant([[1.0, 0.0]]), [tf.shape(images)[0], 1])
    result = evaluation.evaluate_robustness(
        model, (x, y), epsilon=0.1, attacks=("pgd20", "apgd_ce"), standalone_attacks=True
    )
    assert result.attack_accuracy == {"pgd20": 0.6, "apgd_ce": 0.8}
    assert result.robust_accuracy == pytest.approx(0.4)
    np.testing.assert_array_equal(result.robust_correct, [False, False, False, True, True])


def test_an_example_is_robust_only_if_every_restart_fails(monkeypatch):
    # Restart r of the fake PGD fools example r only.
    calls = tf.Variable(0)

    def fake_pgd(model_fn, x, y, **kwargs):
        with tf.control_dependencies([calls.assign_add(1)]):
            restart = calls.read_value() - 1
        fooled = tf.range(tf.shape(x)[0]) == restart
        return tf.where(fooled[:, None, None, None], tf.zeros_like(x), x)

    monkeypatch.setattr(attacks, "pgd", fake_pgd)
    model = lambda images: tf.concat([0.5 - images[:, 0, 0], images[:, 0, 0] - 0.5], axis=1)
    x = np.full((6, 1, 1, 1), 0.9, np.float32)
    y = np.ones(6, np.int32)
    result = evaluation.evaluate_robustness(
        model,
        (x, y),
        epsilon=0.01,
        restarts=3,
        attacks=("pgd5", "apgd_ce5"),
        standalone_attacks=True,
    )
    np.testing.assert_array_equal(result.attack_correct["pgd5"], [0, 0, 0, 1, 1, 1])
    assert result.attack_accuracy["apgd_ce5"] == 1.0
    assert result.robust_accuracy == pytest.approx(0.5)


def test_each_attack_runs_only_on_the_examples_still_standing(monkeypatch):
    # The fake attack fools every example it is given whose pixel is below
    # its threshold, and records how many it was given.
    given = {}

    def fake_attack_fn(model_fn, spec, **kwargs):
        threshold = {"pgd20": 0.4, "apgd_ce": 0.6}[spec.name]

        def correct(x, y, seed):
            given[spec.name] = given.get(spec.name, 0) + len(x)
            return tf.constant(x[:, 0, 0, 0] >= threshold)

        return correct

    monkeypatch.setattr(evaluation.suite, "_attack_fn", fake_attack_fn)
    x = np.linspace(0.05, 0.95, 10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], np.int32)  # the last one is misclassified
    model = lambda images: tf.tile(tf.constant([[0.0, 1.0]]), [tf.shape(images)[0], 1])
    result = evaluation.evaluate_robustness(
        model, (x, y), epsilon=0.1, attacks=("pgd20", "apgd_ce"), batch_size=3
    )
    # pgd20 breaks 0.05..0.35 (4 examples); apgd_ce sees only the 5 left standing.
    assert given == {"pgd20": 9, "apgd_ce": 5}
    assert result.attacked_examples == {"pgd20": 9, "apgd_ce": 5}
    # Accuracy after each: apgd_ce breaks 0.45 and 0.55 of the five.
    assert result.attack_accuracy == {"pgd20": 0.5, "apgd_ce": 0.3}
    assert result.robust_accuracy == pytest.approx(0.3)
    assert result.to_dict()["standalone_attacks"] is False


def test_the_cascade_has_the_standalone_worst_case_per_example(fashion, normal_model, monkeypatch):
    # Without random starts every attack is a deterministic function of each
    # example, so running it on fewer examples must not change any outcome.
    pgd = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: pgd(*a, **{**k, "random_start": False}))
    apgd_module = sys.modules["keras_adr.attacks.apgd"]  # `attacks.apgd` is the function
    monkeypatch.setattr(apgd_module, "_apgd_start", lambda x, *args: x)
    _, (x, y) = fashion
    common = dict(epsilon=0.05, attacks=("fgsm", "pgd10", "apgd_ce20"), batch_size=32, seed=0)
    cascade = evaluation.evaluate_robustness(normal_model, (x, y), **common)
    standalone = evaluation.evaluate_robustness(
        normal_model, (x, y), standalone_attacks=True, **common
    )
    np.testing.assert_array_equal(cascade.robust_correct, standalone.robust_correct)
    assert 0 < cascade.robust_accuracy < cascade.clean_accuracy
    standing = standalone.clean_correct.copy()
    for name in common["attacks"]:
        assert cascade.attacked_examples[name] == standing.sum() < len(x)
        standing &= standalone.attack_correct[name]
        np.testing.assert_array_equal(cascade.attack_correct[name], standing)
    assert standalone.attacked_examples == {name: len(x) for name in common["attacks"]}


# --- Arguments ---------------------------------------------------------------


def _untimed(summary):
    """A result's `to_dict` without its wall-clock times."""
    if isinstance(summary, dict):
        return {k: _untimed(v) for k, v in summary.items() if k != "attack_seconds"}
    return [_untimed(v) for v in summary] if isinstance(summary, list) else summary


def test_an_eval_config_and_keyword_arguments_make_the_same_call():
    model = lambda images: tf.concat([0.5 - images[:, 0, 0], images[:, 0, 0] - 0.5], axis=1)
    x = np.linspace(0.3, 0.9, 8, dtype=np.float32).reshape(8, 1, 1, 1)
    y = np.ones(8, np.int32)
    options = dict(epsilon=0.1, attacks=("pgd5", "apgd_ce5"), batch_size=3, seed=1)
    config = evaluation.EvalConfig(**options)
    from_config = _untimed(evaluation.evaluate_robustness(model, (x, y), config).to_dict())
    keywords = evaluation.evaluate_robustness(model, (x, y), **options)
    assert _untimed(keywords.to_dict()) == from_config
    assert from_config["robust_accuracy"] == 0.5  # Pixels above 0.6 stay on the right side.
    # Keyword arguments override the config's fields.
    identity = evaluation.evaluate_robustness(model, (x, y), config, epsilon=0.0)
    assert identity.epsilon == 0 and identity.robust_accuracy == identity.clean_accuracy == 0.625
    with pytest.raises(TypeError, match="epsilon"):
        evaluation.evaluate_robustness(model, (x, y), attacks=("pgd5", "apgd_ce5"))
    with pytest.raises(TypeError, match="restart"):
        evaluation.evaluate_robustness(model, (x, y), config, restart=2)
    with pytest.raises(ValueError, match="EvalConfig"):
        evaluation.evaluate_robustness(model, (x, y), {"epsilon": 0.1})
    # In a sweep the config's epsilon is the headline.
    sweep = evaluation.epsilon_sweep(model, (x, y), [0.2], config)
    assert sweep.epsilons == [0.0, 0.1, 0.2, 0.5] and sweep.headline.epsilon == 0.1
    assert _untimed(sweep.headline.to_dict()) == from_config
    keywords = evaluation.epsilon_sweep(model, (x, y), [0.2], **options)
    assert _untimed(keywords.to_dict()) == _untimed(sweep.to_dict())
    # Without a config or an epsilon, the headline is the largest epsilon.
    no_epsilon = {k: v for k, v in options.items() if k != "epsilon"}
    sweep = evaluation.epsilon_sweep(model, (x, y), [0.05, 0.2], **no_epsilon)
    assert sweep.epsilons == [0.0, 0.05, 0.2, 0.5] and sweep.headline.epsilon == 0.2


def test_parse_attack():
    assert evaluation.parse_attack("pgd100") == evaluation.AttackSpec("pgd100", "pgd", 100)
    assert evaluation.parse_attack("apgd_ce").steps == 100
    spec = evaluation.parse_attack("apgd_dlr_t50")
    assert (spec.kind, spec.steps, spec.loss, spec.targeted) == ("apgd", 50, "dlr", True)
    assert evaluation.parse_attack("apgd_dlr").targeted is False
    for bad in ("pgd", "pgd0", "cw", "apgd_kl", "fgsm2", 20):
        with pytest.raises(ValueError):
            evaluation.parse_attack(bad)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(attacks=("fgsm",)), "too weak"),
        (dict(attacks=("fgsm", "pgd20")), "too weak"),
        (dict(attacks=("apgd_ce", "apgd_dlr_t")), "too weak"),
        (dict(attacks=("pgd20", "pgd20", "apgd_ce")), "duplicate"),
        (dict(attacks="pgd20,apgd_ce"), "list"),
        (dict(attacks=("pgd20", "apgd_xx")), "Unknown attack"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(norm="l1"), "norm"),
        (dict(restarts=0), "restarts"),
        (dict(num_examples=0), "num_examples"),
        (dict(batch_size=0), "batch_size"),
        (dict(apgd_targets=0), "apgd_targets"),
        (dict(seed=0.5), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    x = np.full((4, 2, 2, 1), 0.5, np.float32)
    y = np.zeros(4, np.int32)
    kwargs = {"epsilon": 0.1, "attacks": ("pgd5", "apgd_ce5"), **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate_robustness(lambda images: images, (x, y), **kwargs)


def test_bad_data_raises():
    model = keras.Sequential(
        [keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    kwargs = dict(epsilon=0.1, attacks=("pgd5", "apgd_ce5"))
    y = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="uint8|floats"):
        evaluation.evaluate_robustness(model, (np.zeros((4, 2, 2, 1), np.uint8), y), **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]; received values in \[2, 2\]"):
        evaluation.evaluate_robustness(model, (np.full((4, 2, 2, 1), 2.0, np.float32), y), **kwargs)
    with pytest.raises(ValueError, match="Labels must be in"):
        evaluation.evaluate_robustness(model, (np.zeros((4, 2, 2, 1), np.float32), y + 3), **kwargs)
    with pytest.raises(ValueError, match="labels"):
        evaluation.evaluate_robustness(model, (np.zeros((4, 2, 2, 1), np.float32), y[:3]), **kwargs)
    with pytest.raises(ValueError, match="model"):
        evaluation.evaluate_robustness(42, (np.zeros((4, 2, 2, 1), np.float32), y), **kwargs)


# --- Sanity checks -----------------------------------------------------------


def _result(
    epsilon, attack_accuracy, n=100, clean=0.9, robust=None, clean_correct=None, robust_correct=None
):
    clean_correct = np.arange(n) < clean * n if clean_correct is None else clean_correct
    robust = min(attack_accuracy.values()) if robust is None else robust
    robust_correct = np.arange(n) < robust * n if robust_correct is None else robust_correct
    return evaluation.RobustnessResult(
        epsilon=epsilon,
        norm="linf",
        attacks=tuple(attack_accuracy),
        restarts=1,
        num_examples=n,
        clean_accuracy=clean,
        attack_accuracy=attack_accuracy,
        robust_accuracy=robust,
        clean_correct=clean_correct,
        attack_correct={},
        robust_correct=robust_correct,
        attack_seconds={},
        image_shape=(28, 28, 1),
    )


def _status(checks):
    return {c.name: c.status for c in checks}


def test_sanity_checks_on_constructed_results():
    good = [
        _result(0.0, {"fgsm": 0.9, "pgd20": 0.9, "pgd100": 0.9, "apgd_ce": 0.9}),
        _result(0.1, {"fgsm": 0.6, "pgd20": 0.5, "pgd100": 0.45, "apgd_ce": 0.44}),
        _result(0.5, {"fgsm": 0.1, "pgd20": 0.0, "pgd100": 0.0, "apgd_ce": 0.0}),
    ]
    assert set(_status(evaluation.sanity_checks(good)).values()) == {"passed"}

    bad = [
        _result(0.0, {"pgd20": 0.8, "apgd_ce": 0.8}, robust_correct=np.arange(100) < 80),
        _result(0.1, {"fgsm": 0.4, "pgd20": 0.5, "pgd100": 0.55, "apgd_ce": 0.5}, robust=0.4),
        _result(0.2, {"pgd20": 0.5, "apgd_ce": 0.5}),
        _result(0.5, {"pgd20": 0.3, "apgd_ce": 0.3}),
    ]
    status = _status(evaluation.sanity_checks(bad))
    assert status == {
        "attack_suite": "passed",
        "epsilon_zero_equals_clean": "failed",
        "non_increasing_in_epsilon": "failed",
        "more_pgd_steps_not_weaker": "failed",
        "iterative_not_weaker_than_fgsm": "failed",
        "near_zero_at_large_epsilon": "failed",
    }
    with pytest.raises(evaluation.SanityCheckError, match="near_zero_at_large_epsilon"):
        evaluation.sanity_checks(bad, raise_on_failure=True)

    # Within the tolerance (one example of 100): sampling noise, not a failure.
    noisy = [
        _result(0.1, {"pgd20": 0.50, "pgd100": 0.51, "apgd_ce": 0.5}),
        _result(0.2, {"pgd20": 0.51, "apgd_ce": 0.51}),
    ]
    status = _status(evaluation.sanity_checks(noisy))
    assert status["more_pgd_steps_not_weaker"] == "passed"
    assert status["non_increasing_in_epsilon"] == "passed"

    # A single result cannot run the sweep checks: skipped, not passed.
    status = _status(evaluation.sanity_checks(good[1]))
    assert status["near_zero_at_large_epsilon"] == "skipped"
    assert status["epsilon_zero_equals_clean"] == "skipped"
    assert status["more_pgd_steps_not_weaker"] == "passed"


def test_sweep_on_a_normal_model_passes_the_sanity_checks(fashion, normal_model, tmp_path):
    _, (x, y) = fashion
    sweep = evaluation.epsilon_sweep(
        normal_model,
        (x, y),
        [0.05],
        headline_epsilon=0.05,
        attacks=_FAST_ATTACKS,
        seed=0,
        standalone_attacks=True,
    )
    assert sweep.epsilons == [0.0, 0.05, 0.5]
    checks = evaluation.sanity_checks(sweep, raise_on_failure=True)
    assert all(c.passed for c in checks), evaluation.format_summary(sweep, checks)

    zero, mid, large = sweep.results
    assert zero.robust_accuracy == zero.clean_accuracy == mid.clean_accuracy
    assert mid.robust_accuracy < mid.clean_accuracy
    assert mid.robust_accuracy <= min(mid.attack_accuracy.values())
    np.testing.assert_array_equal(
        mid.robust_correct, evaluation.worst_case_correct(mid.clean_correct, mid.attack_correct)
    )
    # APGD is at least as strong as PGD-20 on the same examples (one example of slack).
    assert mid.attack_accuracy["apgd_ce20"] <= mid.attack_accuracy["pgd20"] + 1 / len(x)
    assert large.robust_accuracy <= evaluation.NEAR_ZERO_ACCURACY
    assert sweep.headline is mid

    paths = evaluation.write_report(
        sweep, tmp_path / "report", checks=checks, metadata={"model": "dense"}
    )
    report = json.loads(pathlib.Path(paths["json"]).read_text())
    assert report["headline"]["robust_accuracy"] == mid.robust_accuracy
    assert report["sanity_checks_passed"] is True
    assert report["epsilons"] == [0.0, 0.05, 0.5]
    assert "worst case" in pathlib.Path(paths["markdown"]).read_text()
    assert pathlib.Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = evaluation.format_summary(sweep, checks)
    assert "worst-case robust accuracy" in summary and "FAIL" not in summary


def test_sanity_checks_trip_on_a_gradient_masked_model(fashion, masked_model, tmp_path):
    _, (x, y) = fashion
    # Clean accuracy is fine; the zero input gradient leaves the attacks nowhere to go.
    sweep = evaluation.epsilon_sweep(masked_model, (x, y), [], attacks=_FAST_ATTACKS, seed=0)
    assert sweep.results[0].clean_accuracy > 0.5
    checks = evaluation.sanity_checks(sweep)
    status = _status(checks)
    assert status["near_zero_at_large_epsilon"] == "failed"
    assert status["epsilon_zero_equals_clean"] == "passed"
    with pytest.raises(evaluation.SanityCheckError):
        evaluation.sanity_checks(sweep, raise_on_failure=True)
    assert "SANITY CHECKS FAILED" in evaluation.format_summary(sweep, checks)
    paths = evaluation.write_report(sweep, tmp_path, checks=checks)
    assert json.loads(pathlib.Path(paths["json"]).read_text())["sanity_checks_passed"] is False


# --- Model loading -----------------------------------------------------------


def _export(model, path, logits_scale=1.0):
    """A SavedModel with the export module's interface: serving_default(images) -> dict."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        logits = model(images, training=False) * logits_scale
        return {
            "probabilities": tf.nn.softmax(logits),
            "logits": logits,
            "classes": tf.argmax(logits, -1),
        }

    archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32, name="images")],
    )
    archive.write_out(str(path), verbose=False)


def test_load_model_saved_model_and_serving_layout(fashion, normal_model, tmp_path):
    _, (x, y) = fashion
    x, y = x[:40], y[:40]
    base = tmp_path / "serving"
    _export(normal_model, base / "2")
    _export(normal_model, base / "10", logits_scale=2.0)  # The highest version, numerically.
    (base / "notes").mkdir()

    loaded = evaluation.load_model(base)
    assert loaded.kind == "saved_model" and loaded.path.endswith("10")
    assert loaded.num_classes == 10
    np.testing.assert_allclose(loaded(x), 2.0 * normal_model(x), rtol=1e-5, atol=1e-5)
    assert evaluation.load_model(base / "2").path.endswith("2")

    # Gradients flow through the signature: the attacks work on the SavedModel.
    from_saved = evaluation.evaluate_robustness(
        loaded, (x, y), epsilon=0.05, attacks=("pgd10", "apgd_ce10"), seed=0
    )
    from_keras = evaluation.evaluate_robustness(
        normal_model, (x, y), epsilon=0.05, attacks=("pgd10", "apgd_ce10"), seed=0
    )
    assert from_saved.clean_accuracy == from_keras.clean_accuracy
    assert from_saved.robust_accuracy < from_saved.clean_accuracy
    assert abs(from_saved.robust_accuracy - from_keras.robust_accuracy) <= 3 / len(x)


def test_load_model_keras_file_and_errors(normal_model, tmp_path):
    path = tmp_path / "model.keras"
    normal_model.save(path)
    loaded = evaluation.load_model(str(path))
    x = np.full((2, 28, 28, 1), 0.5, np.float32)
    assert loaded.kind == "keras"
    np.testing.assert_allclose(loaded(x), normal_model(x), rtol=1e-5, atol=1e-5)

    with pytest.raises(FileNotFoundError):
        evaluation.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a SavedModel"):
        evaluation.load_model(tmp_path / "empty")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=".keras"):
        evaluation.load_model(tmp_path / "weights.h5")
    module = tf.Module()
    module.f = tf.function(
        lambda images: {"logits": images}, input_signature=[tf.TensorSpec((None, 3), tf.float32)]
    )
    tf.saved_model.save(module, str(tmp_path / "no_signature"), signatures={"other": module.f})
    with pytest.raises(ValueError, match="serving_default"):
        evaluation.load_model(tmp_path / "no_signature")


# --- The adr-evaluate program ------------------------------------------------


def _run_cli(*args):
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [sys.executable, "-m", "keras_adr.cli.evaluate", *args],
        cwd=_REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_end_to_end(normal_model, tmp_path):
    model_path = tmp_path / "model.keras"
    normal_model.save(model_path)
    out = tmp_path / "eval"
    result = _run_cli(
        f"--model_path={model_path}",
        "--num_examples=24",
        "--batch_size=16",
        "--epsilon=0.05",
        "--epsilons=0.02",
        "--attacks=fgsm,pgd5,apgd_ce10",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worst-case robust accuracy" in result.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["epsilons"] == [0.0, 0.02, 0.05, 0.5]
    assert report["headline"]["epsilon"] == 0.05
    assert report["headline"]["num_examples"] == 24
    assert report["metadata"]["model_kind"] == "keras"
    assert report["sanity_checks_passed"] is True
    assert (out / "results.md").is_file() and (out / "robust_accuracy_vs_epsilon.png").is_file()


@pytest.mark.slow
def test_cli_fails_on_sanity_check_failure(masked_model, tmp_path):
    # Exported as a SavedModel: the program needs no custom layer to load it.
    _export(masked_model, tmp_path / "serving" / "1")
    args = [
        f"--model_path={tmp_path / 'serving'}",
        "--num_examples=40",
        "--batch_size=40",
        "--attacks=pgd5,apgd_ce10",
        "--epsilon=0.1",
    ]
    result = _run_cli(*args, f"--output_dir={tmp_path / 'eval'}")
    assert result.returncode != 0
    assert "sanity checks failed" in result.stderr and "near_zero_at_large_epsilon" in result.stderr
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["sanity_checks_passed"] is False

    result = _run_cli(*args, "--allow_sanity_failures", "--nosanity_sweep", "--restarts=2")
    assert result.returncode == 0, result.stderr[-3000:]

    result = _run_cli(*args, "--attacks=fgsm")
    assert result.returncode != 0 and "too weak" in result.stderr


@pytest.mark.slow
def test_cli_autoattack_fails_on_its_sanity_checks(masked_model, tmp_path):
    # Binarize gives every input a zero gradient: AutoAttack's zero-gradient check fails.
    _export(masked_model, tmp_path / "serving" / "1")
    # The defense of the model card comes from the export metadata.
    metadata_dir = tmp_path / "serving" / "1" / "assets.extra"
    metadata_dir.mkdir()
    (metadata_dir / "keras_adr_metadata.json").write_text(json.dumps({"defense": "binarized"}))
    args = [
        f"--model_path={tmp_path / 'serving'}",
        "--suite=autoattack",
        "--num_examples=4",
        "--batch_size=4",
        "--epsilon=0.1",
    ]
    result = _run_cli(*args, f"--output_dir={tmp_path / 'eval'}")
    assert result.returncode != 0
    assert "sanity checks failed" in result.stderr and "no_zero_input_gradients" in result.stderr
    assert "[FAIL] no_zero_input_gradients" in result.stdout
    card = json.loads((tmp_path / "eval" / "autoattack.json").read_text())
    assert card["keras_adr"]["checks"]["zero_gradient_fraction"] == 1.0
    assert card["defense"] == "binarized" and card["name"] == str(tmp_path / "serving")
    assert card["keras_adr"]["sanity_checks_passed"] is False
    # --allow_sanity_failures (one code path for every suite): the test above.
