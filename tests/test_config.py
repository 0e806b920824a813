"""ADRConfig / AttackConfig / EvalConfig validation and serialisation; presets; model builders."""

import dataclasses
import json

import numpy as np
import pytest

import keras_adr
from keras_adr import config as config_lib
from keras_adr import models, presets, specs


def test_defaults_follow_the_authors_with_the_bounded_formulation():
    config = keras_adr.ADRConfig()
    assert config.latent_normalization == "rms" and config.smoothness_push == "overlap"
    paper = presets.get("adr_pgd_paper")
    assert paper.latent_normalization == "none" and paper.smoothness_push == "cross_entropy"
    assert paper.replace(latent_normalization="rms", smoothness_push="overlap") == config
    assert config.objective == "pgd"
    for name in (
        "local_compactness",
        "local_smoothness",
        "global_compactness",
        "global_smoothness",
        "conditional_entropy",
    ):
        assert getattr(config, name) == 1.0
    assert config.label_propagation == 0.0 and config.label_scale == 0.99
    assert config.trades_beta == 6.0 and config.natural_weight == config.adversarial_weight == 1


def test_round_trip():
    config = presets.get("adr_trades", attack_norm="l2", attack_epsilon=0.5, label_scale=0.9)
    restored = keras_adr.ADRConfig.from_config(config.get_config())
    assert restored == config and isinstance(restored.attack, keras_adr.AttackConfig)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objective="mart"), "objective"),
        (dict(local_compactness=-1.0), "local_compactness"),
        (dict(label_propagation=float("nan")), "label_propagation"),
        (dict(label_scale=0.0), "label_scale"),
        (dict(label_scale=1.0), "label_scale"),
        (dict(label_scale=1.5), "label_scale"),
        (dict(global_compactness_features=0.0), "global_compactness_features"),
        (dict(global_compactness_features=1.5), "global_compactness_features"),
        (dict(trades_beta=-6.0), "trades_beta"),
        (dict(compactness_distance="cos"), "compactness_distance"),
        (dict(pairwise_scope="node"), "pairwise_scope"),
        (dict(latent_normalization="l2"), "latent_normalization"),
        (dict(smoothness_push="hinge"), "smoothness_push"),
        (dict(propagation_alpha=1.0), "propagation_alpha"),
        (dict(propagation_neighbors=0), "propagation_neighbors"),
        (dict(objective="standard"), "ADR terms"),
        (dict(attack="pgd"), "attack"),
    ],
)
def test_adr_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_adr.ADRConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(step_size=-1.0), "step_size"),
        (dict(steps=0), "steps"),
        (dict(steps=1.5), "steps"),
        (dict(norm="l0"), "norm"),
        (dict(loss="dlr"), "loss"),
        (dict(clip_min=1.0, clip_max=0.5), "clip_min"),
        (dict(random_start="yes"), "random_start"),
        (dict(unroll=1), "unroll"),
        (dict(unroll="yes"), "unroll"),
    ],
)
def test_attack_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_adr.AttackConfig(**kwargs)


def test_eval_config_defaults_and_round_trip():
    config = specs.EvalConfig()
    assert config.attacks == specs.EVAL_ATTACKS
    assert config.restarts == specs.EVAL_RESTARTS
    assert config.batch_size == specs.EVAL_BATCH_SIZE
    assert config.apgd_targets == specs.APGD_TARGETS
    assert config.epsilon == keras_adr.AttackConfig().epsilon and config.norm == "linf"
    config = specs.EvalConfig(
        epsilon=np.float32(0.25),
        norm="l2",
        attacks=["pgd10", "apgd_dlr_t50"],
        restarts=np.int64(2),
        num_examples=64,
        seed=None,
        batch_size=32,
        apgd_targets=9,
        clip_min=-1,
        clip_max=1,
        precision="mixed_bfloat16",
    )
    # Plain Python values (a list of attacks becomes a tuple): hashable and JSON-ready.
    assert config.attacks == ("pgd10", "apgd_dlr_t50") and type(config.restarts) is int
    assert config.epsilon == pytest.approx(0.25) and type(config.epsilon) is float
    serialised = json.loads(json.dumps(config.get_config()))
    assert specs.EvalConfig.from_config(serialised) == config
    assert hash(config) == hash(specs.EvalConfig.from_config(serialised))
    assert config.replace(epsilon=0.5).epsilon == 0.5 and config.epsilon == pytest.approx(0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epsilon = 0.3
    with pytest.raises(ValueError, match="valid fields"):
        config.replace(epsilons=0.3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"),
        (dict(epsilon=True), "epsilon"),
        (dict(norm="l1"), "norm"),
        (dict(attacks=("fgsm", "pgd20")), "too weak"),
        (dict(attacks="pgd20,apgd_ce"), "list"),
        (dict(attacks=("pgd20", "apgd_xx")), "Unknown attack"),
        (dict(attacks=("pgd20", "pgd20", "apgd_ce")), "duplicate"),
        (dict(restarts=0), "restarts"),
        (dict(restarts=1.5), "restarts"),
        (dict(num_examples=0), "num_examples"),
        (dict(seed=0.5), "seed"),
        (dict(batch_size=0), "batch_size"),
        (dict(apgd_targets=0), "apgd_targets"),
        (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
        (dict(precision="float16"), "precision"),
    ],
)
def test_eval_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        specs.EvalConfig(**kwargs)


def test_presets():
    assert presets.NAMES == (
        "standard",
        "pgd_at",
        "trades",
        "adr_pgd",
        "adr_trades",
        "adr_pgd_paper",
        "adr_trades_paper",
    )
    assert presets.get("adr_trades_paper").objective == "trades"
    assert (
        presets.get("standard").enabled_terms == () and not presets.get("standard").uses_adversary
    )
    assert presets.get("pgd_at").enabled_terms == () and presets.get("pgd_at").objective == "pgd"
    assert presets.get("trades").objective == "trades" and presets.get("trades").enabled_terms == ()
    assert presets.get("adr_pgd").enabled_terms == config_lib.ADR_TERMS[:5]
    assert presets.get("adr_trades").objective == "trades"
    assert presets.get("pgd_at", attack_steps=40).attack.steps == 40
    with pytest.raises(ValueError, match="adr_pgd"):
        presets.get("madry")
    with pytest.raises(ValueError, match="Unknown ADRConfig field"):
        presets.get("pgd_at", epsilon=0.3)
    with pytest.raises(ValueError, match="steps"):
        presets.get("pgd_at", attack_steps=0)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        keras_adr.ADRConfig().objective = "trades"


@pytest.mark.parametrize(
    "name,kwargs,latent_size",
    [
        ("small_cnn", dict(input_shape=(28, 28, 1)), 1024),
        ("cifar_cnn", dict(input_shape=(32, 32, 3)), 3200),
        ("resnet18", dict(input_shape=(16, 16, 3)), 512),
        ("wide_resnet", dict(input_shape=(16, 16, 3), depth=10, width=1), 64),
    ],
)
def test_architectures(name, kwargs, latent_size):
    model = models.get(name, num_classes=7, **kwargs)
    x = np.random.default_rng(0).uniform(size=(2, *kwargs["input_shape"])).astype(np.float32)
    assert model(x).shape == (2, 7)
    assert model.get_layer("latent").output.shape[-1] == latent_size
    assert isinstance(model.get_layer("latent"), keras_adr.layers.Latent)
    adr = keras_adr.ADRModel(model)
    assert adr(x, return_latent=True)[1].shape == (2, latent_size)


def test_architecture_errors():
    with pytest.raises(ValueError, match="valid models"):
        models.get("vgg16")
    with pytest.raises(ValueError, match="6n"):
        models.wide_resnet(depth=20)
    with pytest.raises(ValueError, match="input_shape"):
        models.small_cnn(input_shape=(28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        models.small_cnn(num_classes=1)


def test_standardize_layer_normalises_inside_the_model(tmp_path):
    import keras

    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.9, size=(64, 4, 4, 3)).astype(np.float32)
    layer = keras_adr.layers.Standardize()
    model = keras.Sequential([keras.Input((4, 4, 3)), layer])
    layer.adapt(images)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(layer.adapt_mean.numpy(), flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.std.numpy(), flat.std(0), rtol=1e-4)
    out = np.asarray(model(images)).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-3)
    assert not layer.trainable_weights
    path = tmp_path / "s.keras"
    model.save(path)
    np.testing.assert_allclose(
        np.asarray(keras.saving.load_model(path)(images)), np.asarray(model(images)), atol=1e-6
    )
    # Constants, and the colour builders carry one.
    fixed = keras_adr.layers.Standardize(mean=[0.5, 0.5, 0.5], std=0.25)
    np.testing.assert_allclose(np.asarray(fixed(np.full((1, 1, 1, 3), 0.75, np.float32))), 1.0)
    assert isinstance(
        models.get("cifar_cnn").get_layer("standardize"), keras_adr.layers.Standardize
    )
    with pytest.raises(ValueError, match="std"):
        keras_adr.layers.Standardize(std=[1.0, 0.0, 1.0])


def test_step_size_follows_the_pgd_rule_unless_given():
    attack = presets.get("adr_pgd").attack
    assert attack.step_size is None
    assert attack.resolved_step_size == pytest.approx(2.5 * attack.epsilon / attack.steps)
    moved = presets.get("adr_pgd", attack_epsilon=0.3, attack_steps=10).attack
    assert moved.resolved_step_size == pytest.approx(0.075)
    assert presets.get("adr_pgd", attack_step_size=0.01).attack.resolved_step_size == 0.01
    assert "step_size=None (2.5 * epsilon / steps = 0.025)" in repr(presets.get("adr_pgd"))
    round_trip = config_lib.AttackConfig.from_config(moved.get_config())
    assert round_trip == moved and round_trip.resolved_step_size == pytest.approx(0.075)


_FLAGS_TO_CONFIG = """
import sys
from absl import flags
from keras_adr import presets
from keras_adr.cli import train
flags.FLAGS(["adr-train", *sys.argv[1:]])
config = train.adr_config_from_flags()
print(repr(config == presets.get(flags.FLAGS.defense)), config.attack.resolved_step_size)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, same_as_preset, step_size",
    [
        ([], True, 0.025),
        (["--defense=trades"], True, 0.025),
        (["--epsilon=0.2"], False, 0.05),
        (["--epsilon=0.2", "--step_size=0.03"], False, 0.03),
    ],
)
def test_adr_train_runs_the_preset_of_python(argv, same_as_preset, step_size):
    """`presets.get(name)` in Python is exactly the run `adr-train --defense=name` makes."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FLAGS_TO_CONFIG, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == repr(same_as_preset)
    assert float(out[1]) == pytest.approx(step_size)


def test_unroll_is_an_attack_option_that_run_comparisons_ignore():
    config = keras_adr.presets.get("adr_pgd")
    assert config.attack.unroll == "auto"  # today's rule: unrolled on CPUs
    # A config saved before the field loads with the default.
    old = config.get_config()
    del old["attack"]["unroll"]
    assert keras_adr.ADRConfig.from_config(old) == config
    rolled = config.replace(attack_unroll=False)
    assert keras_adr.ADRConfig.from_config(rolled.get_config()).attack.unroll is False
    # Speed only: what run directories and benchmark fingerprints compare.
    assert rolled.result_config() == config.result_config() == old
    assert rolled.get_config() != config.get_config()


def test_adr_train_attack_unroll_flag():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from absl import flags\n"
        "from keras_adr.cli import train\n"
        "flags.FLAGS(['adr-train', *sys.argv[1:]])\n"
        "print(repr(train.adr_config_from_flags().attack.unroll))\n"
    )
    for argv, expected in ([], "'auto'"), (["--attack_unroll=false"], "False"):
        out = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True
        ).stdout.split()
        assert out[-1] == expected
