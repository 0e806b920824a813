"""ADRModel / ADRMixin: the step against hand-written steps, fit, save/load."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import blob_data, tiny_cnn

import keras_adr
from keras_adr import data, losses, presets


def _clone(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


class _FixedAdversary:
    """Replaces the attack by a fixed batch so two steps see the same x_adv."""

    def __init__(self, x_adv):
        self.x_adv = tf.constant(x_adv)

    def __call__(self, x, y, loss=None):
        return self.x_adv


def _one_sgd_step(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def test_zero_adr_weights_equal_hand_written_pgd_at_step():
    keras.utils.set_random_seed(1)
    x, y = blob_data(32)
    x_adv = np.clip(x + np.random.default_rng(2).uniform(-0.1, 0.1, x.shape), 0, 1).astype(
        np.float32
    )
    backbone = tiny_cnn()
    reference = _clone(backbone)

    model = keras_adr.ADRModel(backbone, presets.get("pgd_at"))
    model.adversarial_examples = _FixedAdversary(x_adv)
    with tf.GradientTape() as tape:
        loss, _, _, _ = model.compute_adr_loss(x, y, x_adv)
    adr_grads = tape.gradient(loss, model.trainable_variables)

    with tf.GradientTape() as tape:
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        expected_loss = ce(y, reference(x, training=True)) + ce(y, reference(x_adv, training=True))
    expected_grads = tape.gradient(expected_loss, reference.trainable_variables)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for got, want in zip(adr_grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    # The compiled train_step applies exactly these gradients.
    before = [v.numpy() for v in model.trainable_variables]
    _one_sgd_step(model, x, y)
    for b, g, v in zip(before, expected_grads, model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), b - g.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["adr_pgd", "adr_pgd_paper"])
def test_default_adr_step_equals_functional_terms(preset):
    keras.utils.set_random_seed(3)
    x, y = blob_data(24)
    x_adv = np.clip(x + 0.05, 0, 1).astype(np.float32)
    config = presets.get(preset, label_propagation=0.5, propagation_neighbors=4)
    norm = config.latent_normalization
    push = config.smoothness_push
    model = keras_adr.ADRModel(tiny_cnn(), config)
    loss, _, sums, _ = model.compute_adr_loss(x, y, x_adv)
    latent = keras.Model(
        model.backbone.input, [model.backbone.outputs[0], model.backbone.get_layer("latent").output]
    )
    logits, z = latent(x, training=True)
    logits_adv, z_adv = latent(x_adv, training=True)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = {
        "ce": ce(y, logits),
        "adv_ce": ce(y, logits_adv),
        "local_compactness": losses.local_compactness(z, z_adv, normalization=norm),
        "local_smoothness": losses.local_smoothness(logits, logits_adv),
        "global_compactness": losses.global_compactness(y, z, z_adv, 0.99, normalization=norm),
        "global_smoothness": losses.global_smoothness(y, logits, logits_adv, 0.99, push=push),
        "conditional_entropy": losses.conditional_entropy(logits_adv),
        "label_propagation": losses.label_propagation(y, z, z_adv, logits_adv, k=4),
    }
    diagnostics = {
        "latent_norm": np.linalg.norm(np.reshape(z, (len(x), -1)), axis=1).mean(),
        "logits_norm": np.linalg.norm(logits, axis=1).mean(),
    }
    assert set(sums) == set(expected) | set(diagnostics)
    for name, value in {**expected, **diagnostics}.items():
        np.testing.assert_allclose(sums[name] / len(x), value, rtol=1e-5, err_msg=name)
    weights = {name: 1.0 for name in expected}
    weights["label_propagation"] = 0.5
    np.testing.assert_allclose(loss, sum(weights[n] * expected[n] for n in expected), rtol=1e-5)


def test_sampled_global_compactness_draws_new_features_each_step():
    keras.utils.set_random_seed(3)
    x, y = blob_data(24)
    x_adv = np.clip(x + 0.05, 0, 1).astype(np.float32)
    config = presets.get("adr_pgd", global_compactness_features=0.25)
    model = keras_adr.ADRModel(tiny_cnn(), config)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # steps that change no weight
    latent = keras.Model(model.backbone.input, model.backbone.get_layer("latent").output)
    z, z_adv = latent(x, training=True), latent(x_adv, training=True)

    def sampled_term():
        seed = model._step_seed()
        features = losses.sample_features(z.shape[1], 0.25, seed)
        assert len(features) == round(0.25 * z.shape[1])
        expected = losses.global_compactness(y, z, z_adv, normalization="rms", features=features)
        got = model.compute_adr_loss(x, y, x_adv)[2]["global_compactness"] / len(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        return seed.numpy()

    first = sampled_term()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert not np.array_equal(sampled_term(), first)  # the optimizer's step moved the seed
    keras.utils.set_random_seed(3)
    again = keras_adr.ADRModel(tiny_cnn(), config)
    assert again._sampling_salt == model._sampling_salt  # reproducible with the seed
    # The exact term draws no salt: a run's other random numbers stay as they were.
    keras.utils.set_random_seed(3)
    keras_adr.ADRModel(tiny_cnn(), presets.get("adr_pgd"))
    after_model = np.random.random()
    keras.utils.set_random_seed(3)
    tiny_cnn()
    assert np.random.random() == after_model


def test_trades_objective():
    keras.utils.set_random_seed(4)
    x, y = blob_data(16)
    x_adv = np.clip(x - 0.05, 0, 1).astype(np.float32)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("trades", trades_beta=3.0))
    loss, _, sums, (logits, logits_adv) = model.compute_adr_loss(x, y, x_adv)
    assert set(sums) == {"ce", "trades_kl", "latent_norm", "logits_norm"}
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(loss, ce + 3.0 * losses.trades_kl(logits, logits_adv), rtol=1e-5)
    assert model.adr_config.attack_loss == "kl"


def test_fit_reports_every_term_and_test_step():
    keras.utils.set_random_seed(5)
    x, y = blob_data(64)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("adr_trades", attack_steps=2))
    model.compile(optimizer="adam")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, validation_data=(x, y))
    expected = {
        "loss",
        "accuracy",
        "adv_accuracy",
        "ce",
        "trades_kl",
        "local_compactness",
        "local_smoothness",
        "global_compactness",
        "global_smoothness",
        "conditional_entropy",
        "latent_norm",
        "logits_norm",
        "val_loss",
        "val_accuracy",
        "val_adv_accuracy",
    }
    assert set(history.history) == expected
    assert all(np.isfinite(v[0]) for v in history.history.values())
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(results) == {"loss", "accuracy", "adv_accuracy"}
    assert results["adv_accuracy"] <= results["accuracy"] + 1e-6


def test_standard_objective_has_no_adversary():
    x, y = blob_data(32)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("standard"))
    model.compile(optimizer="adam")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "ce", "latent_norm", "logits_norm"}


@pytest.fixture(scope="module")
def fashion_subset():
    try:
        return data.load("fashion_mnist", "train", batch_size=64, shuffle=True, take=1024, seed=0)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


@pytest.mark.slow
def test_one_epoch_on_fashion_mnist_reduces_loss(fashion_subset):
    keras.utils.set_random_seed(6)
    model = keras_adr.ADRModel(
        keras_adr.models.small_cnn(), presets.get("adr_pgd", attack_steps=3, attack_epsilon=0.1)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = next(iter(fashion_subset.unbatch().batch(256)))

    def objective():
        tf.random.set_seed(7)
        x_adv = model.adversarial_examples(x, y)
        return float(model.compute_adr_loss(x, y, x_adv, training=False)[0])

    before = objective()
    model.fit(fashion_subset, epochs=1, verbose=0)
    after = objective()
    assert after < before - 0.5, (before, after)


class MixinModel(keras_adr.ADRMixin, keras.Model):
    def __init__(self, num_classes=3, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.flatten = keras.layers.Flatten()
        self.classifier = keras.layers.Dense(num_classes)

    def call(self, x, training=False, return_latent=False):
        z = self.flatten(self.conv(x))
        logits = self.classifier(z)
        return (logits, z) if return_latent else logits

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


keras.saving.register_keras_serializable(package="tests")(MixinModel)


def test_mixin_fit_and_save_load(tmp_path):
    keras.utils.set_random_seed(8)
    x, y = blob_data(64)
    model = MixinModel(adr_config=presets.get("adr_pgd", attack_steps=2))
    model.compile(optimizer="adam")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert "global_compactness" in history.history
    path = tmp_path / "mixin.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.adr_config == model.adr_config
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def test_adr_model_save_load_round_trip(tmp_path):
    keras.utils.set_random_seed(9)
    x, y = blob_data(64)
    config = presets.get("adr_trades", attack_steps=2, label_scale=0.9)
    model = keras_adr.ADRModel(tiny_cnn(batchnorm=True), config)
    model.compile(optimizer="adam")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = tmp_path / "adr.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_adr.ADRModel)
    assert loaded.adr_config == config and loaded.latent_layer == "latent"
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # The loaded model keeps training.
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)


def test_call_returns_logits_like_the_backbone():
    x, _ = blob_data(8)
    backbone = tiny_cnn()
    model = keras_adr.ADRModel(backbone)
    np.testing.assert_array_equal(model(x), backbone(x))
    logits, z = model(x, return_latent=True)
    assert z.shape == (8, 8 * 8 * 4)


def test_missing_latent_layer_lists_layers():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="hidden")(inputs))
    with pytest.raises(ValueError, match=r"no layer named 'latent'.*hidden"):
        keras_adr.ADRModel(keras.Model(inputs, outputs))
    model = keras_adr.ADRModel(keras.Model(inputs, outputs), latent_layer="hidden")
    assert model(np.zeros((1, 4)), return_latent=True)[1].shape == (1, 3)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="functional"):
        keras_adr.ADRModel(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="ADRConfig"):
        keras_adr.ADRModel(tiny_cnn(), adr_config="adr_pgd")
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("pgd_at"))
    with pytest.raises(ValueError, match=r"\['loss', 'metrics'\] would be ignored"):
        model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    with pytest.raises(ValueError, match="images, integer_labels"):
        model.train_step((np.zeros((2, 8, 8, 1)),))


@pytest.mark.parametrize(
    "labels,match", [(-1, "negative label"), (1.5, "fractional"), (3, "num_classes=3")]
)
def test_labels_are_checked_at_the_step(labels, match):
    x, y = blob_data(16)
    y = np.asarray(y).astype(np.float32 if isinstance(labels, float) else np.int64)
    y[3] = labels
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("adr_pgd", attack_steps=1))
    model.compile(optimizer="adam")
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_softmax_backbone_warns():
    inputs = keras.Input((8, 8, 1))
    z = keras.layers.Flatten(name="latent")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(z)
    with pytest.warns(UserWarning, match="softmax"):
        keras_adr.ADRModel(keras.Model(inputs, outputs))


def test_forward_hook_can_fuse_the_two_passes():
    """`clean_and_adversarial_outputs` is the documented override point."""

    class Fused(keras_adr.ADRModel):
        calls = 0

        def clean_and_adversarial_outputs(self, x, x_adv, training=True):
            Fused.calls += 1
            logits, z = self(tf.concat([x, x_adv], 0), training=training, return_latent=True)
            n = tf.shape(x)[0]
            return (logits[:n], z[:n]), (logits[n:], z[n:])

    keras.utils.set_random_seed(7)
    x, y = blob_data(16)
    x_adv = np.clip(x + 0.05, 0, 1).astype(np.float32)
    backbone = tiny_cnn()
    config = presets.get("adr_pgd", attack_steps=1)
    plain = keras_adr.ADRModel(backbone, config)
    fused = Fused(backbone, config)
    expected = plain.compute_adr_loss(x, y, x_adv)[0]
    np.testing.assert_allclose(fused.compute_adr_loss(x, y, x_adv)[0], expected, rtol=1e-5)
    assert Fused.calls == 1


def test_latent_layer_is_found_by_type_in_any_functional_model(tmp_path):
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inputs))
    z = keras_adr.layers.Latent(name="codes")(features)
    logits = keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(z))
    model = keras_adr.ADRModel(keras.Model(inputs, logits))
    assert model.latent_layer == "codes"
    x = np.zeros((2, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(model(x, return_latent=True)[1], keras.Model(inputs, features)(x))
    path = tmp_path / "m.keras"
    model.save(path)
    assert keras.saving.load_model(path).latent_layer == "codes"
    # Sequential models carry it too.
    sequential = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras_adr.layers.Latent(),
            keras.layers.Dense(3),
        ]
    )
    assert keras_adr.ADRModel(sequential)(x, return_latent=True)[1].shape == (2, 64)


def test_several_latent_layers_are_an_error_listing_them():
    inputs = keras.Input((4,))
    a = keras_adr.layers.Latent(name="first")(inputs)
    b = keras_adr.layers.Latent(name="second")(keras.layers.Dense(3)(a))
    with pytest.raises(ValueError, match=r"2 Latent layers.*first.*second"):
        keras_adr.ADRModel(keras.Model(inputs, keras.layers.Dense(2)(b)))
