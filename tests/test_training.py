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

    def __call__(self, x, y, loss=None, epsilon=None, seed=None):
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
    weights = {"ce": config.natural_weight, "adv_ce": config.adversarial_weight}
    weights |= {name: getattr(config, name) for name in expected if name not in weights}
    assert weights["label_propagation"] == 0.5
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
    assert again._step_salt == model._step_salt  # reproducible with the seed
    # Every model has a salt (the training attack's starts use it too); other
    # seeds give other salts.
    keras.utils.set_random_seed(4)
    assert keras_adr.ADRModel(tiny_cnn(), presets.get("adr_pgd"))._step_salt != model._step_salt


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
    }
    # Validation reports what training does (test_step: the same objective).
    assert set(history.history) == expected | {f"val_{name}" for name in expected}
    assert all(np.isfinite(v[0]) for v in history.history.values())
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(results) == expected
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
    with pytest.raises(ValueError, match=r"takes no \['loss'\]: the ADR objective"):
        model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"takes no \['loss_weights'\]"):
        model.compile(optimizer="adam", loss_weights=[1.0])
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


def _normalise(t):
    e = keras.ops.exp(t)
    return e / keras.ops.sum(e, axis=-1, keepdims=True)


_PROBABILITY_HEADS = {
    "softmax_layer": lambda x: keras.layers.Softmax(name="head")(keras.layers.Dense(3)(x)),
    "dense_softmax": lambda x: keras.layers.Dense(3, activation="softmax", name="head")(x),
    "activation": lambda x: keras.layers.Activation("softmax", name="head")(
        keras.layers.Dense(3)(x)
    ),
    "lambda": lambda x: keras.layers.Lambda(_normalise, name="head")(keras.layers.Dense(3)(x)),
}


def _backbone(head):
    inputs = keras.Input((8, 8, 1))
    z = keras.layers.Flatten(name="latent")(inputs)
    return keras.Model(inputs, head(z))


@pytest.mark.parametrize("head", sorted(_PROBABILITY_HEADS))
def test_probability_backbones_are_refused_naming_the_last_layer(head):
    with pytest.raises(ValueError, match="'head'.*need logits.*allow_probabilities=True"):
        keras_adr.ADRModel(_backbone(_PROBABILITY_HEADS[head]))


def test_allow_probabilities_warns_and_is_kept_in_the_config(tmp_path):
    with pytest.warns(UserWarning, match="probabilities"):
        model = keras_adr.ADRModel(
            _backbone(_PROBABILITY_HEADS["softmax_layer"]), allow_probabilities=True
        )
    assert model.get_config()["allow_probabilities"] is True
    path = tmp_path / "probabilities.keras"
    model.save(path)
    with pytest.warns(UserWarning, match="probabilities"):
        loaded = keras.saving.load_model(path)
    assert loaded.allow_probabilities is True


def test_small_logits_are_not_mistaken_for_probabilities():
    # Outputs in [0, 1] that do not sum to 1: logits that happen to be small.
    head = lambda x: keras.layers.Dense(  # noqa: E731
        3, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(0.2)
    )(x)
    model = keras_adr.ADRModel(_backbone(head))
    assert model.allow_probabilities is False


@pytest.mark.parametrize("name", keras_adr.models.ARCHITECTURES)
def test_the_library_models_pass_the_logits_check(name):
    shape = (32, 32, 3) if name in ("resnet18", "wide_resnet") else (28, 28, 1)
    keras_adr.ADRModel(keras_adr.models.get(name, input_shape=shape, num_classes=10))


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


def test_validation_attacks_at_the_validation_epsilon():
    keras.utils.set_random_seed(0)
    x, y = blob_data(256)
    model = keras_adr.ADRModel(
        tiny_cnn(), presets.get("pgd_at", attack_epsilon=0.3, attack_steps=3)
    )
    model.compile(keras.optimizers.Adam(1e-2))
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    at_training_epsilon = model.evaluate(x, y, verbose=0, return_dict=True)
    assert at_training_epsilon["adv_accuracy"] < at_training_epsilon["accuracy"] - 0.05
    model.validation_epsilon = 1e-6  # an attack this small changes no prediction
    tiny = model.evaluate(x, y, verbose=0, return_dict=True)
    assert tiny["adv_accuracy"] == tiny["accuracy"] == at_training_epsilon["accuracy"]


def _compiled():
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("pgd_at", attack_steps=1))
    model.compile(optimizer="adam")
    return model


def test_one_hot_labels_are_named_in_fit_and_in_the_evaluation():
    x, y = blob_data(16)
    one_hot = np.eye(3, dtype=np.float32)[y]
    with pytest.raises(ValueError, match=r"class indices; got one-hot rows .*argmax"):
        _compiled().fit(x, one_hot, batch_size=8, epochs=1, verbose=0)
    flattened = tf.data.Dataset.from_tensors((x, one_hot.reshape(-1)))
    with pytest.raises(ValueError, match="one per image.*argmax"):
        _compiled().fit(flattened, epochs=1, verbose=0)
    # Unknown batch sizes: the same check at run time.
    ragged = tf.data.Dataset.from_generator(
        lambda: iter([(x, one_hot.reshape(-1))]),
        output_signature=(
            tf.TensorSpec([None, 8, 8, 1], tf.float32),
            tf.TensorSpec([None], tf.float32),
        ),
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="one per image.*argmax"):
        _compiled().fit(ragged, epochs=1, verbose=0)

    from keras_adr import evaluation

    with pytest.raises(ValueError, match=r"class indices; got one-hot rows .*argmax"):
        evaluation.materialise((x, one_hot), None, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"class indices; got one-hot rows .*argmax"):
        evaluation.materialise(tf.data.Dataset.from_tensor_slices((x, one_hot)), None, 0.0, 1.0)
    with pytest.raises(ValueError, match="16 images but 48 labels.*one-hot.*argmax"):
        evaluation.materialise((x, one_hot.reshape(-1)), None, 0.0, 1.0)


@pytest.mark.parametrize("kind", ["arrays", "dataset"])
def test_fit_on_no_examples_is_an_error(kind):
    x, y = np.zeros((0, 8, 8, 1), np.float32), np.zeros((0,), np.int32)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("pgd_at", attack_steps=1))
    model.compile(optimizer="adam")
    data_args = (
        (x, y) if kind == "arrays" else (tf.data.Dataset.from_tensor_slices((x, y)).batch(4),)
    )
    with pytest.raises(ValueError, match="0 examples"):
        model.fit(*data_args, epochs=2, verbose=0)


def test_a_sequential_without_input_is_told_what_works():
    layers = [keras.layers.Flatten(), keras_adr.layers.Latent(), keras.layers.Dense(3)]
    with pytest.raises(ValueError, match=r"Sequential without an input shape.*keras\.Input"):
        keras_adr.ADRModel(keras.Sequential(layers))
    keras_adr.ADRModel(keras.Sequential([keras.Input((8, 8, 1)), *layers]))


@keras.saving.register_keras_serializable(package="keras_adr_tests")
class TrueClassMargin(keras.metrics.Metric):
    """Mean of `logit[y] - max(logits)` (0 when right): a custom metric with state."""

    def __init__(self, name="true_class_margin", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        logits = tf.cast(y_pred, tf.float32)
        margin = tf.gather(logits, labels, batch_dims=1) - tf.reduce_max(logits, axis=-1)
        self.total.assign_add(tf.reduce_sum(margin))
        self.count.assign_add(tf.cast(tf.shape(logits)[0], tf.float32))

    def result(self):
        return self.total / tf.maximum(self.count, 1.0)


def _margin(logits, y):
    logits = np.asarray(logits, np.float64)
    return np.mean(logits[np.arange(len(y)), y] - logits.max(-1))


def _top2(logits, y):
    return np.mean([label in np.argsort(row)[-2:] for row, label in zip(np.asarray(logits), y)])


def test_compiled_metrics_on_clean_and_adversarial_predictions_survive_save_load(tmp_path):
    keras.utils.set_random_seed(11)
    x, y = blob_data(48, num_classes=3)
    x_adv = np.clip(x + 0.08 * np.sign(np.sin(9.0 * x)), 0, 1).astype(np.float32)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("adr_pgd", attack_steps=1))
    model.compile(
        optimizer="adam",
        metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2)],
        weighted_metrics=[TrueClassMargin()],
    )
    names = {"sparse_top_k_categorical_accuracy", "true_class_margin"}
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    for prefix in ("", "adv_", "val_", "val_adv_"):
        assert {prefix + name for name in names} <= set(history.history)

    def check(model):
        # Against independent computations on fixed adversarial examples.
        model.adversarial_examples = _FixedAdversary(x_adv[:16])
        model.make_test_function(force=True)  # fit traced it with the real attack
        results = model.evaluate(x[:16], y[:16], batch_size=16, verbose=0, return_dict=True)
        results = {name: float(value) for name, value in results.items()}  # tensors before 3.9
        clean, adversarial = model(x[:16]).numpy(), model(x_adv[:16]).numpy()
        assert results["sparse_top_k_categorical_accuracy"] == pytest.approx(_top2(clean, y[:16]))
        assert results["adv_sparse_top_k_categorical_accuracy"] == pytest.approx(
            _top2(adversarial, y[:16])
        )
        assert results["true_class_margin"] == pytest.approx(_margin(clean, y[:16]), abs=1e-5)
        assert results["adv_true_class_margin"] == pytest.approx(
            _margin(adversarial, y[:16]), abs=1e-5
        )
        assert results["true_class_margin"] != pytest.approx(results["adv_true_class_margin"])
        return results

    before = check(model)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    after = check(restored)
    assert after == pytest.approx(before, abs=1e-5)


def test_a_metric_without_a_usable_config_is_a_clear_error():
    class NoConfig(keras.metrics.Mean):
        def __init__(self, scale):
            super().__init__(name="no_config")
            self.scale = scale

    model = keras_adr.ADRModel(tiny_cnn(), presets.get("pgd_at"))
    with pytest.raises(ValueError, match="'no_config' cannot be copied for its adv_no_config"):
        model.compile(optimizer="adam", metrics=[NoConfig(2.0)])


def test_val_loss_is_the_training_objective_and_early_stopping_watches_it():
    keras.utils.set_random_seed(12)
    x, y = blob_data(32, num_classes=3)
    x_adv = np.clip(x - 0.07, 0, 1).astype(np.float32)
    model = keras_adr.ADRModel(tiny_cnn(), presets.get("adr_pgd", attack_steps=1))
    model.adversarial_examples = _FixedAdversary(x_adv)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3)
    history = model.fit(
        x, y, batch_size=32, epochs=2, verbose=0, validation_data=(x, y), callbacks=[stopping]
    )
    # The objective of the final weights on the validation batch, by hand:
    # the training step's loss per example, in inference mode.
    _, objective, sums, _ = model.compute_adr_loss(x, y, x_adv, training=False)
    val_loss = history.history["val_loss"]
    assert val_loss[-1] == pytest.approx(float(objective), rel=1e-5)
    assert history.history["val_ce"][-1] == pytest.approx(float(sums["ce"]) / len(x), rel=1e-5)
    assert val_loss[-1] > history.history["val_ce"][-1] + 0.1  # not the clean cross-entropy
    assert stopping.best == pytest.approx(min(val_loss))
