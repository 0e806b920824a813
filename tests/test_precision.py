"""keras_adr.precision and the attacks under mixed precision (issue 14).

Keras' dtype policy is global state: every test here runs inside the
`_restore_policy` fixture, which puts back the policy it found.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import blob_data, tiny_cnn

import keras_adr
from keras_adr import attacks, export, precision
from keras_adr.attacks._gradient import input_gradient, power_of_two_scale

# bfloat16 keeps 8 significant bits: a relative rounding of 2**-8 per
# operation, a few of which add up in a small network.
BFLOAT16_RTOL = 0.05


@pytest.fixture(autouse=True)
def _restore_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: Fake CPU\n"
        f"flags\t\t: fpu sse2 avx2 {' '.join(flags)}\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    return str(path)


# --- Choosing the policy ---------------------------------------------------


@pytest.mark.parametrize(
    "flags, gpus, expected",
    [
        # Without AMX bfloat16 ran 0.7x-2x float32's speed (issue 14): float32.
        (["avx512f", "avx512_bf16"], [], "float32"),
        (["amx_tile", "amx_bf16"], [], "mixed_bfloat16"),
        (["avx512_bf16", "amx_tile", "amx_bf16"], [], "mixed_bfloat16"),
        (["avx512f", "avx512_vnni"], [], "float32"),
        (["avx512_bf16"], [(7, 5)], "float32"),  # The GPU computes: a T4 has no bfloat16.
        ([], [(8, 0)], "mixed_bfloat16"),
        ([], [(9, 0), (8, 6)], "mixed_bfloat16"),
        ([], [(8, 0), (7, 0)], "float32"),  # Every replica must support it.
    ],
)
def test_auto_picks_what_the_machine_supports(tmp_path, flags, gpus, expected):
    cpuinfo = _cpuinfo(tmp_path, flags)
    # No probe: on AVX512_BF16 without AMX, float32 (the probe is tested below).
    chosen = precision.resolve(
        "auto", cpuinfo=cpuinfo, gpu_capabilities=gpus, environ={}, probe=None
    )
    assert chosen == expected


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, "mixed_bfloat16"),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "mixed_bfloat16"),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, "mixed_bfloat16"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "float32"),  # no AMX kernels
        ({"DNNL_MAX_CPU_ISA": "AVX2"}, "float32"),
        ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32"),  # Eigen's kernels
    ],
)
def test_auto_needs_onednn_free_to_use_amx(tmp_path, environ, expected):
    amx = _cpuinfo(tmp_path, ["avx512_bf16", "amx_bf16"])
    assert precision.resolve("auto", cpuinfo=amx, gpu_capabilities=[], environ=environ) == expected
    assert precision.resolve("mixed_bfloat16", gpu_capabilities=[], environ=environ) == (
        "mixed_bfloat16"
    )  # an explicit choice is kept


@pytest.mark.parametrize(
    "flags, gpus, environ, policy, reason",
    [
        (["amx_bf16"], [], {}, "mixed_bfloat16", "the CPU has AMX"),
        (["amx_bf16"], [], {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "float32", "capped below it"),
        (["avx512_bf16"], [], {}, "float32", "no start-up probe ran"),
        (["avx2"], [], {}, "float32", "no bfloat16 instructions"),
        ([], [(8, 0)], {}, "mixed_bfloat16", "compute capability 8.0 or more"),
        ([], [(7, 5)], {}, "float32", "below 8.0"),
    ],
)
def test_auto_choice_says_why(tmp_path, flags, gpus, environ, policy, reason):
    cpuinfo = _cpuinfo(tmp_path, flags)
    kwargs = dict(cpuinfo=cpuinfo, gpu_capabilities=gpus, environ=environ, probe=None)
    chosen, why = precision.auto_choice(**kwargs)
    assert chosen == policy and reason in why
    assert precision.resolve("auto", **kwargs) == policy


def _fake_probe(speedup, calls):
    return lambda: calls.append(speedup) or speedup


@pytest.mark.parametrize(
    "speedup, policy, reason",
    [
        (2.1, "mixed_bfloat16", "timed bfloat16 at 2.10x float32's speed (at least 1.2x)"),
        (1.2, "mixed_bfloat16", "at 1.20x"),
        (1.15, "float32", "timed bfloat16 at 1.15x float32's speed (below 1.2x)"),
        (0.7, "float32", "at 0.70x"),  # slower: never picked
    ],
)
def test_auto_asks_the_probe_on_avx512_bf16_without_amx(tmp_path, speedup, policy, reason):
    calls = []
    chosen, why = precision.auto_choice(
        cpuinfo=_cpuinfo(tmp_path, ["avx512f", "avx512_bf16"]),
        gpu_capabilities=[],
        environ={},
        probe=_fake_probe(speedup, calls),
    )
    assert (chosen, calls) == (policy, [speedup])
    assert "AVX512_BF16 but no AMX" in why and reason in why


@pytest.mark.parametrize(
    "flags, gpus, environ, policy",
    [
        (["avx512_bf16", "amx_bf16"], [], {}, "mixed_bfloat16"),  # AMX: no probe needed
        (["avx2"], [], {}, "float32"),  # no bfloat16 instructions: emulated
        (["avx512_bf16"], [(8, 0)], {}, "mixed_bfloat16"),  # the GPU computes
        (["avx512_bf16"], [(7, 5)], {}, "float32"),
        (["avx512_bf16"], [], {"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32"),  # Eigen's kernels
    ],
)
def test_auto_probes_only_on_avx512_bf16_without_amx(tmp_path, flags, gpus, environ, policy):
    calls = []
    chosen = precision.resolve(
        "auto",
        cpuinfo=_cpuinfo(tmp_path, flags),
        gpu_capabilities=gpus,
        environ=environ,
        probe=_fake_probe(3.0, calls),
    )
    assert (chosen, calls) == (policy, [])


def test_resolve_auto_probes_by_default(tmp_path, monkeypatch):
    # `resolve("auto")` for one's own model chooses as adr-train does.
    monkeypatch.setattr(precision, "probe_bfloat16_speedup", lambda: 1.9)
    precision.process_bfloat16_speedup.cache_clear()
    try:
        cpu = _cpuinfo(tmp_path, ["avx512_bf16"])
        assert precision.resolve("auto", cpuinfo=cpu, gpu_capabilities=[], environ={}) == (
            "mixed_bfloat16"
        )
    finally:
        precision.process_bfloat16_speedup.cache_clear()


def test_process_speedup_is_measured_once(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "probe_bfloat16_speedup", lambda: calls.append(1) or 1.8)
    precision.process_bfloat16_speedup.cache_clear()
    try:
        assert precision.process_bfloat16_speedup() == precision.process_bfloat16_speedup() == 1.8
        assert calls == [1]
    finally:
        precision.process_bfloat16_speedup.cache_clear()


def test_cpu_flags_reads_the_first_processor(tmp_path):
    flags = precision.cpu_flags(_cpuinfo(tmp_path, ["amx_bf16"]))
    assert {"fpu", "avx2", "amx_bf16"} <= flags and "avx512_bf16" not in flags
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert precision.resolve("auto", cpuinfo=str(tmp_path / "missing"), gpu_capabilities=[]) == (
        "float32"
    )


def test_explicit_precisions_are_kept_and_unknown_ones_refused(tmp_path):
    for policy in precision.POLICIES:
        assert precision.resolve(policy, gpu_capabilities=[]) == policy
    with pytest.raises(ValueError, match="`precision` must be one of auto, float32"):
        precision.resolve("bfloat16")


def test_policy_scope_restores_the_global_policy_also_after_an_error():
    keras.config.set_dtype_policy("float32")
    with pytest.raises(RuntimeError):
        with precision.policy_scope("mixed_bfloat16"):
            assert keras.config.dtype_policy().name == "mixed_bfloat16"
            assert keras.layers.Dense(2).compute_dtype == "bfloat16"
            raise RuntimeError
    assert keras.config.dtype_policy().name == "float32"


def test_speed_warnings_name_the_known_slow_paths(tmp_path):
    plain = _cpuinfo(tmp_path, ["avx2"])
    (warning,) = precision.speed_warnings(
        "mixed_bfloat16", cpuinfo=plain, gpu_capabilities=[], environ={}
    )[:1]
    assert "without AVX512_BF16 or AMX" in warning
    fast = _cpuinfo(tmp_path, ["avx512_bf16"])
    onednn_off = precision.speed_warnings(
        "mixed_bfloat16", cpuinfo=fast, gpu_capabilities=[], environ={"TF_ENABLE_ONEDNN_OPTS": "0"}
    )
    assert any("TF_ENABLE_ONEDNN_OPTS=0" in w for w in onednn_off)
    assert precision.speed_warnings("float32", gpu_capabilities=[]) == []
    assert precision.speed_warnings("mixed_float16", gpu_capabilities=[(8, 0)]) == []


def test_bfloat16_probe_is_float32_time_over_bfloat16_time():
    # A fake clock: each float32 step (timed first) takes 2 s, each bfloat16 step 0.5 s.
    ticks = iter([0, 2, 2, 4, 4, 6, 10, 10.5, 10.5, 11, 11, 11.5])
    assert precision.probe_bfloat16_speedup(repeats=3, timer=lambda: next(ticks)) == 4.0


def test_slow_bfloat16_process_is_reported_at_start(tmp_path):
    fast_cpu = _cpuinfo(tmp_path, ["avx512_bf16"])
    calls = []

    def probe(speedup):
        return lambda: calls.append(speedup) or speedup

    check = lambda policy, speedup, cpu=fast_cpu: precision.log_speed_warnings(
        policy, probe=probe(speedup), cpuinfo=cpu, gpu_capabilities=[], environ={}
    )
    (warning,) = [w for w in check("mixed_bfloat16", 1.1) if "x float32's speed" in w]
    assert "only 1.10x" in warning and "--precision=float32" in warning
    assert not [w for w in check("mixed_bfloat16", 2.4) if "x float32's speed" in w]
    assert calls == [1.1, 2.4]
    check("float32", 1.1)
    check("mixed_bfloat16", 1.1, cpu=_cpuinfo(tmp_path, ["avx2"]))  # emulated: warned otherwise
    assert calls == [1.1, 2.4]  # the probe ran only for bfloat16 on a bfloat16 CPU


# --- Float32 copies and export ---------------------------------------------


def _mixed_tiny(policy, seed=0):
    keras.utils.set_random_seed(seed)
    with precision.policy_scope(policy):
        return tiny_cnn(batchnorm=True)


def test_float32_copy_is_the_same_function_without_rounding():
    mixed = _mixed_tiny("mixed_bfloat16")
    x, _ = blob_data(32)
    copy = precision.with_policy(mixed, "float32")
    assert precision.compute_dtype(mixed) == "bfloat16"
    assert precision.compute_dtype(copy) == "float32"
    # Independently: the same architecture built in float32, given the weights.
    reference = _mixed_tiny("float32", seed=1)
    reference.set_weights(mixed.get_weights())
    np.testing.assert_allclose(copy(x), reference(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(mixed(x), np.float32), reference(x), rtol=BFLOAT16_RTOL, atol=BFLOAT16_RTOL
    )
    assert precision.with_policy(reference, "float32") is reference


def test_float32_copy_of_an_adr_model_keeps_its_config():
    keras.utils.set_random_seed(0)
    config = keras_adr.presets.get("adr_pgd", attack_epsilon=0.2)
    with precision.policy_scope("mixed_bfloat16"):
        model = keras_adr.ADRModel(tiny_cnn(), config)
    copy = precision.with_policy(model)
    assert isinstance(copy, keras_adr.ADRModel) and copy.adr_config == config
    assert precision.compute_dtype(copy) == "float32"
    for a, b in zip(copy.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", precision.POLICIES)
def test_model_trained_one_step_exports_float32_signatures(tmp_path, policy):
    keras.utils.set_random_seed(0)
    x, y = blob_data(16)
    with precision.policy_scope(policy):
        model = keras_adr.ADRModel(tiny_cnn(), keras_adr.presets.get("pgd_at", attack_steps=1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    path = export.export_saved_model(model.backbone, tmp_path / "serving")
    loaded = tf.saved_model.load(path)
    for name in (export.SERVING_DEFAULT, export.SERVE_UINT8):
        signature = loaded.signatures[name]
        _, inputs = signature.structured_input_signature
        outputs = signature.structured_outputs
        assert inputs[export.INPUT_NAME].dtype == (
            tf.uint8 if name == export.SERVE_UINT8 else tf.float32
        )
        assert outputs[export.OUTPUT_LOGITS].dtype == tf.float32
        assert outputs[export.OUTPUT_PROBABILITIES].dtype == tf.float32
    served = loaded.signatures[export.SERVING_DEFAULT](images=tf.constant(x))
    keras_logits = np.asarray(model(x), np.float32)
    tolerance = 1e-5 if policy == "float32" else BFLOAT16_RTOL
    np.testing.assert_allclose(served["logits"], keras_logits, rtol=tolerance, atol=tolerance)


@pytest.mark.slow
def test_adr_export_serves_a_bfloat16_model_in_float32(tmp_path):
    """`adr-export` of a .keras file trained in bfloat16 computes in float32."""
    import subprocess
    import sys

    keras.utils.set_random_seed(0)
    with precision.policy_scope("mixed_bfloat16"):
        model = keras_adr.ADRModel(tiny_cnn(), keras_adr.presets.get("pgd_at"))
    model.save(tmp_path / "bf16.keras")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_adr.cli.export",
            f"--model_path={tmp_path / 'bf16.keras'}",
            f"--export_dir={tmp_path / 'serving'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    x, _ = blob_data(16)
    served = tf.saved_model.load(result.stdout.strip().splitlines()[-1])
    logits = served.signatures[export.SERVING_DEFAULT](images=tf.constant(x))["logits"]
    float32 = precision.with_policy(model.backbone, "float32")
    np.testing.assert_allclose(logits, float32(x), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(model.backbone(x), np.float32) - logits).max() > 1e-5


# --- Attacks ---------------------------------------------------------------


def _confident_model(policy):
    """A linear model whose logit margin on `_CONFIDENT_X` (label 0) is 30.

    Its cross-entropy gradient at the logits is about exp(-30) = 1e-13 away
    from the label: below float16's smallest subnormal (6e-8).
    """
    with precision.policy_scope(policy):
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(3)(inputs)
        model = keras.Model(inputs, outputs)
    kernel = np.zeros((4, 3), np.float32)
    kernel[0, 0], kernel[1, 1], kernel[2, 2] = 30.0, 1.0, -1.0
    model.set_weights([kernel, np.zeros(3, np.float32)])
    return model


_CONFIDENT_X = np.array([[1.0, 0.5, 0.5, 0.5]], np.float32)
_CONFIDENT_Y = np.array([0], np.int32)


def _ce(labels):
    return lambda logits: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def test_float16_attack_gradient_does_not_underflow():
    x, y = tf.constant(_CONFIDENT_X), tf.constant(_CONFIDENT_Y)
    model16 = _confident_model("mixed_float16")
    # The construction holds: the plain gradient of the float32 loss of the
    # float32-cast logits vanishes in float16, not in float32.
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_ce(y)(tf.cast(model16(x), tf.float32)))
    assert not np.any(tape.gradient(loss, x))
    model32 = _confident_model("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_ce(y)(model32(x)))
    true_grad = tape.gradient(loss, x).numpy()
    # p_0 rounds to 1 in float32 too: only the pixels of the other logits count.
    assert np.count_nonzero(true_grad) == 2

    _, _, grad16 = input_gradient(model16, _ce(y), x)
    np.testing.assert_array_equal(np.sign(grad16), np.sign(true_grad))
    # PGD moves the float16 model's input exactly as the float32 model's.
    kwargs = dict(epsilon=0.1, step_size=0.04, steps=3, random_start=False)
    x_adv16 = attacks.pgd(model16, x, y, **kwargs).numpy()
    x_adv32 = attacks.pgd(model32, x, y, **kwargs).numpy()
    assert np.abs(x_adv16 - _CONFIDENT_X).max() == pytest.approx(0.1)
    np.testing.assert_allclose(x_adv16, x_adv32, atol=1e-6)


def test_gradient_scaling_is_exact_in_float32(trained_tiny):
    model, x, y = trained_tiny
    x, y = tf.constant(x[:32]), tf.constant(y[:32])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_ce(y)(model(x, training=False)))
    true_grad = tape.gradient(loss, x).numpy().reshape(32, -1)
    _, losses, grad = input_gradient(lambda images: model(images, training=False), _ce(y), x)
    grad = grad.numpy().reshape(32, -1)
    factor = np.abs(grad).max(axis=1) / np.abs(true_grad).max(axis=1)
    np.testing.assert_array_equal(np.log2(factor), np.round(np.log2(factor)))
    np.testing.assert_allclose(grad, true_grad * factor[:, None], rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.sum(losses), loss.numpy(), rtol=1e-6)


def test_power_of_two_scale_brings_each_peak_near_one():
    peaks = tf.constant([[3e-13], [0.7], [5.0], [0.0], [1e-44]], tf.float32)
    scale = power_of_two_scale(peaks).numpy()[:, 0]
    exponents = np.log2(scale)
    np.testing.assert_array_equal(exponents, np.round(exponents))
    scaled = peaks.numpy()[:, 0] * scale
    assert np.all((scaled[:3] >= 0.5) & (scaled[:3] < 2))
    assert scale[3] == 1.0 and np.isfinite(scale[4]) and scaled[4] > 0


def test_float16_pgd_on_a_trained_model_matches_float32(trained_tiny):
    model, x, y = trained_tiny
    x, y = x[:32], y[:32]
    model16 = precision.with_policy(model, "mixed_float16")
    kwargs = dict(epsilon=0.15, step_size=0.05, steps=3, random_start=False)
    x_adv32 = attacks.pgd(model, x, y, **kwargs).numpy()
    x_adv16 = attacks.pgd(model16, x, y, **kwargs).numpy()
    correct = lambda m, images: np.argmax(np.asarray(m(images, training=False)), -1) == y
    # float16 rounds the logits: a pixel whose gradient is near zero may take
    # the other sign; the attacks agree on (almost) every example.
    assert np.mean(np.isclose(x_adv16, x_adv32, atol=1e-5)) > 0.95
    assert abs(correct(model, x_adv32).mean() - correct(model, x_adv16).mean()) <= 2 / 32


# --- adr-evaluate --precision ------------------------------------------------


def test_evaluate_loads_a_keras_model_in_the_requested_precision(tmp_path):
    from keras_adr import evaluation

    mixed = _mixed_tiny("mixed_bfloat16")
    path = str(tmp_path / "model.keras")
    mixed.save(path)
    x, _ = blob_data(8)
    loaded = evaluation.load_model(path)
    assert precision.compute_dtype(loaded._keep_alive) == "float32"
    reference = precision.with_policy(mixed, "float32")
    np.testing.assert_allclose(loaded(x), reference(x), rtol=1e-6, atol=1e-6)
    kept = evaluation.load_model(path, precision="mixed_bfloat16")
    assert precision.compute_dtype(kept._keep_alive) == "bfloat16"

    serving = export.export_saved_model(mixed, tmp_path / "serving")
    with pytest.raises(
        ValueError, match="precision=mixed_bfloat16 .--precision. applies to .keras models"
    ):
        evaluation.load_model(serving, precision="mixed_bfloat16")
    assert evaluation.load_model(serving).kind == "saved_model"


# --- adr-train --precision ---------------------------------------------------


@pytest.mark.slow
def test_run_records_the_precision_and_exports_float32(tmp_path):
    from keras_adr import data, pipeline

    try:
        data.load("fashion_mnist", "test", batch_size=8, take=8)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    options = pipeline.TrainOptions(
        epochs=1,
        train_examples=64,
        validation_examples=0,
        test_examples=32,
        batch_size=64,
        eval_attacks=("pgd2", "apgd_ce2"),
        output_dir=str(tmp_path / "run"),
        strategy="default",
        export_weights="final",
        precision="mixed_bfloat16",
        verbose=0,
    )
    keras.config.set_dtype_policy("float32")
    metrics = pipeline.run(options, keras_adr.presets.get("pgd_at", attack_steps=1))
    assert keras.config.dtype_policy().name == "float32"  # Restored.
    expected = {
        "requested": "mixed_bfloat16",
        "training": "mixed_bfloat16",
        "evaluation": "float32",
        "export": "float32",
    }
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["precision"] == expected
    assert export.read_metadata(metrics["export_path"])["precision"] == expected
    final = keras.saving.load_model(os.path.join(tmp_path, "run", "final.keras"))
    assert precision.compute_dtype(final) == "bfloat16"
    x = data.load("fashion_mnist", "test", batch_size=16, take=16)
    images = next(iter(x))[0].numpy()
    served = tf.saved_model.load(metrics["export_path"]).signatures[export.SERVING_DEFAULT](
        images=tf.constant(images)
    )["logits"]
    # The export is the float32 function of the final weights.
    np.testing.assert_allclose(
        served, precision.with_policy(final.backbone)(images), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        served, np.asarray(final(images), np.float32), rtol=BFLOAT16_RTOL, atol=BFLOAT16_RTOL
    )


def test_auto_run_logs_the_policy_it_picked_and_why(tmp_path, monkeypatch):
    from keras_adr import pipeline

    monkeypatch.setattr(precision, "auto_choice", lambda **_: ("float32", "a stated reason"))
    built, logged = [], []
    monkeypatch.setattr(
        pipeline,
        "_run_stages",
        lambda options, config, strategy, run_dir, policy: built.append(policy),
    )
    # absl's handlers depend on what ran before: record the calls themselves.
    monkeypatch.setattr(pipeline.logging, "info", lambda msg, *args: logged.append(msg % args))
    options = pipeline.TrainOptions(
        output_dir=str(tmp_path / "run"), strategy="default", precision="auto", verbose=0
    )
    pipeline.run(options, keras_adr.presets.get("pgd_at"))
    assert built == ["float32"]
    assert "Training precision: float32 (--precision=auto: a stated reason)." in logged


_AUTO_CHOICE = precision.auto_choice  # before any test replaces it


def _auto_policy_of_a_run(tmp_path, monkeypatch, speedup, workers=1):
    """The policy `pipeline.run` trains in with --precision=auto on a CPU with
    AVX512_BF16 and no AMX whose probe says `speedup`; and whether it probed."""
    from keras_adr import pipeline

    cpu = _cpuinfo(tmp_path, ["avx512_bf16"])
    probed = []

    def choice(probe=None):
        fake = probe and (lambda: probed.append(speedup) or speedup)
        return _AUTO_CHOICE(cpuinfo=cpu, gpu_capabilities=[], environ={}, probe=fake)

    monkeypatch.setattr(precision, "auto_choice", choice)
    monkeypatch.setattr(precision, "log_speed_warnings", lambda policy: [])
    monkeypatch.setattr(pipeline.distribute, "num_workers", lambda strategy: workers)
    built = []
    monkeypatch.setattr(
        pipeline,
        "_run_stages",
        lambda options, config, strategy, run_dir, policy: built.append(policy),
    )
    options = pipeline.TrainOptions(
        output_dir=str(tmp_path / "run"), strategy="default", precision="auto", verbose=0
    )
    pipeline.run(options, keras_adr.presets.get("pgd_at"))
    return built[-1], bool(probed)


def test_auto_resumes_in_the_policy_its_run_recorded(tmp_path, monkeypatch):
    # The probe's answer can change between processes; a resumed run must not.
    assert _auto_policy_of_a_run(tmp_path, monkeypatch, 2.0) == ("mixed_bfloat16", True)
    assert _auto_policy_of_a_run(tmp_path, monkeypatch, 1.0) == ("mixed_bfloat16", False)
    other = tmp_path / "other"
    other.mkdir()
    assert _auto_policy_of_a_run(other, monkeypatch, 1.0) == ("float32", True)
    assert _auto_policy_of_a_run(other, monkeypatch, 2.0) == ("float32", False)


def test_auto_does_not_probe_on_several_workers(tmp_path, monkeypatch):
    # Each worker's probe could answer differently: they take the CPU's answer alone.
    assert _auto_policy_of_a_run(tmp_path, monkeypatch, 2.0, workers=2) == ("float32", False)
