"""PGD and FGSM: constraints, strength, inference mode, argument checks."""

import numpy as np
import pytest
import tensorflow as tf

from keras_adr import attacks


def _ce(model, x, y):
    logits = model(x, training=False)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)))


def _linf(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(1)


def _l2(a, b):
    return np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).reshape(len(a), -1).sum(1))


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_pgd_stays_in_ball_and_range(trained_tiny, norm, epsilon, loss):
    model, x, y = trained_tiny
    x_adv = attacks.pgd(
        model, x, y, epsilon=epsilon, step_size=epsilon / 4, steps=7, norm=norm, loss=loss
    ).numpy()
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    distance = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
    assert distance.max() <= epsilon * (1 + 1e-5)
    assert distance.max() > epsilon / 2  # it actually moved


def test_fgsm_in_ball_and_range(trained_tiny):
    model, x, y = trained_tiny
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        x_adv = attacks.fgsm(model, x, y, epsilon=eps, norm=norm).numpy()
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        distance = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
        assert distance.max() <= eps * (1 + 1e-5)


def test_custom_clip_range(trained_tiny):
    model, x, y = trained_tiny
    x_adv = attacks.pgd(
        model, x * 0.5 + 0.2, y, epsilon=0.3, step_size=0.1, steps=3, clip_min=0.2, clip_max=0.7
    ).numpy()
    assert x_adv.min() >= 0.2 - 1e-7 and x_adv.max() <= 0.7 + 1e-7


def test_pgd_raises_loss_over_clean_and_fgsm(trained_tiny):
    model, x, y = trained_tiny
    eps = 0.3  # the blob classes have a wide margin
    clean = _ce(model, x, y)
    x_fgsm = attacks.fgsm(model, x, y, epsilon=eps)
    x_pgd = attacks.pgd(model, x, y, epsilon=eps, step_size=eps / 4, steps=20)
    assert _ce(model, x_fgsm, y) > clean
    assert _ce(model, x_pgd, y) > _ce(model, x_fgsm, y)
    accuracy = lambda xs: float(np.mean(np.argmax(model(xs, training=False), 1) == y))
    assert accuracy(x_pgd) < accuracy(x)


def test_trades_attack_raises_kl(trained_tiny):
    model, x, y = trained_tiny
    p = tf.nn.softmax(model(x, training=False))

    def kl(xs):
        q = tf.nn.softmax(model(xs, training=False))
        return float(tf.reduce_mean(tf.reduce_sum(p * (tf.math.log(p) - tf.math.log(q)), -1)))

    x_adv = attacks.pgd(model, x, None, epsilon=0.15, step_size=0.03, steps=10, loss="kl")
    noise = tf.clip_by_value(x + 0.001 * tf.random.normal(x.shape), 0, 1)
    assert kl(x_adv) > 10 * max(kl(noise), 1e-6)


def test_attack_does_not_touch_batchnorm_statistics(trained_tiny):
    model, x, y = trained_tiny
    bn = [v for v in model.non_trainable_variables if "moving" in v.path]
    assert bn, "the fixture model must have BatchNorm moving statistics"
    before = [v.numpy().copy() for v in bn]
    attacks.pgd(model, x, y, epsilon=0.1, step_size=0.02, steps=5)
    attacks.pgd(model, x, None, epsilon=0.1, step_size=0.02, steps=5, loss="kl")
    for old, var in zip(before, bn):
        np.testing.assert_array_equal(old, var.numpy())


def test_inside_tf_function_any_batch_size(trained_tiny):
    model, x, y = trained_tiny

    @tf.function(reduce_retracing=True)
    def attack(images, labels):
        return attacks.pgd(model, images, labels, epsilon=0.1, step_size=0.02, steps=4)

    for n in (1, 5, 33):
        x_adv = attack(x[:n], y[:n]).numpy()
        assert x_adv.shape == x[:n].shape
        assert _linf(x_adv, x[:n]).max() <= 0.1 + 1e-6


def _op_types(function, *args):
    return {op.type for op in function.get_concrete_function(*args).graph.get_operations()}


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_unrolled_pgd_is_the_same_attack_without_a_loop(trained_tiny, loss):
    # Unrolled, the graph has no while loop: TensorFlow's oneDNN rewrite
    # sometimes left the max-pool gradients inside the loop on its own slow
    # kernel (docs/mixed-precision.md, "Slow compilations").
    model, x, y = trained_tiny
    x, y = tf.constant(x), tf.constant(y)
    kwargs = dict(epsilon=0.1, step_size=0.03, steps=4, random_start=False, loss=loss)
    looped = tf.function(lambda x, y: attacks.pgd(model, x, y, **kwargs))
    unrolled = tf.function(lambda x, y: attacks.pgd(model, x, y, unroll=True, **kwargs))
    assert "While" in _op_types(looped, x, y) or "StatelessWhile" in _op_types(looped, x, y)
    assert not {"While", "StatelessWhile"} & _op_types(unrolled, x, y)
    np.testing.assert_allclose(unrolled(x, y).numpy(), looped(x, y).numpy(), atol=1e-6)
    assert _linf(unrolled(x, y), x).max() > 0.05  # it moved


def test_adr_model_unrolls_its_training_attack_on_cpus():
    import keras_adr
    from keras_adr import training

    assert not tf.config.list_logical_devices("GPU")  # this suite runs on CPUs
    assert training.unrolls_training_attack()
    model = keras_adr.ADRModel(keras_adr.models.small_cnn(), keras_adr.presets.get("adr_pgd"))
    x = tf.random.uniform([4, 28, 28, 1], seed=1)
    y = tf.constant([0, 1, 2, 3])
    types = _op_types(tf.function(model.adversarial_examples), x, y)
    assert "MaxPoolGrad" in types and not {"While", "StatelessWhile"} & types


def test_graph_mode_rejects_out_of_range_input(trained_tiny):
    model, x, y = trained_tiny

    @tf.function
    def attack(images):
        return attacks.pgd(model, images, y, epsilon=0.1, step_size=0.02, steps=2)

    with pytest.raises(tf.errors.InvalidArgumentError, match="clip_max"):
        attack(x * 3.0)


def test_no_gradient_to_input(trained_tiny):
    model, x, y = trained_tiny
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        x_adv = attacks.pgd(model, xv, y, epsilon=0.1, step_size=0.02, steps=2)
        total = tf.reduce_sum(x_adv)
    assert tape.gradient(total, xv) is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(step_size=0.0), "step_size"),
        (dict(epsilon=float("inf")), "epsilon.*finite"),
        (dict(step_size=float("nan")), "step_size.*finite"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(norm="l1"), "norm"),
        (dict(loss="hinge"), "loss"),
        (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
    ],
)
def test_bad_arguments(trained_tiny, kwargs, match):
    model, x, y = trained_tiny
    args = dict(epsilon=0.1, step_size=0.01, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.pgd(model, x, y, **args)


def test_bad_inputs(trained_tiny):
    model, x, y = trained_tiny
    with pytest.raises(ValueError, match=r"\[clip_min, clip_max\]"):
        attacks.pgd(model, x * 255.0, y, epsilon=0.1, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="floating"):
        attacks.fgsm(model, (x * 255).astype(np.uint8), y, epsilon=0.1)
    with pytest.raises(ValueError, match="labels"):
        attacks.pgd(model, x, None, epsilon=0.1, step_size=0.01, steps=1, loss="ce")
    with pytest.raises(ValueError, match="epsilon"):
        attacks.fgsm(model, x, y, epsilon=0)


def test_non_finite_images_are_rejected_eagerly_and_in_graphs(trained_tiny):
    model, x, y = trained_tiny
    one_nan = x.copy()
    one_nan[0, 0, 0, 0] = np.nan
    for images in (one_nan, np.full_like(x, np.nan), np.where(x > 0.5, np.inf, x)):
        with pytest.raises(ValueError, match="non-finite"):
            attacks.pgd(model, images, y, epsilon=0.1, step_size=0.02, steps=2)

    @tf.function
    def attack(images):
        return attacks.pgd(model, images, y, epsilon=0.1, step_size=0.02, steps=2)

    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        attack(one_nan)


def test_empty_batch_returns_empty(trained_tiny):
    model, x, y = trained_tiny
    empty = x[:0]
    assert (
        attacks.pgd(model, empty, y[:0], epsilon=0.1, step_size=0.02, steps=2).shape == empty.shape
    )
    assert attacks.fgsm(model, empty, y[:0], epsilon=0.1).shape == empty.shape
    assert attacks.apgd(model, empty, y[:0], epsilon=0.1, steps=4).shape == empty.shape


def test_linf_epsilon_above_half_the_range_warns(trained_tiny):
    model, x, y = trained_tiny
    with pytest.warns(UserWarning, match="pixel units"):
        attacks.pgd(model, x[:2], y[:2], epsilon=8.0, step_size=1.0, steps=1)


def test_per_example_uses_the_static_rank_and_never_builds_a_negative_fill():
    from keras_adr.attacks._common import _per_example

    mask = tf.constant([1.0, 2.0])

    @tf.function(input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None, 8, 8, 1])])
    def static(mask, like):
        out = _per_example(mask, like)
        assert out.shape.as_list() == [None, 1, 1, 1]
        return out

    @tf.function(input_signature=[tf.TensorSpec([None]), tf.TensorSpec(None)])
    def unknown_rank(mask, like):
        return _per_example(mask, like)

    assert static(mask, tf.zeros([2, 8, 8, 1])).shape == (2, 1, 1, 1)
    assert unknown_rank(mask, tf.zeros([2, 3])).shape == (2, 1)
    assert unknown_rank(mask[:1], tf.zeros([])).shape == (1,)  # No tf.ones([-1]) at run time.
    # A scalar `like` inside tf.cond (as in the attacks) used to fail tracing with
    # "Fill dimensions must be >= 0" for the node cond/ones.
    in_cond = tf.function(
        lambda m: tf.cond(tf.size(m) > 0, lambda: _per_example(m, tf.reduce_sum(m)), lambda: m)
    )
    with pytest.raises(ValueError, match="must have a batch axis"):
        in_cond(mask)


@pytest.mark.parametrize("unroll, loops", [(False, True), (True, False), ("auto", False)])
def test_adr_model_unrolls_its_training_attack_as_its_config_says(unroll, loops):
    import keras_adr

    config = keras_adr.presets.get("adr_pgd", attack_steps=2, attack_unroll=unroll)
    model = keras_adr.ADRModel(keras_adr.models.small_cnn(), config)
    x = tf.random.uniform([4, 28, 28, 1], seed=1)
    y = tf.constant([0, 1, 2, 3])
    types = _op_types(tf.function(model.adversarial_examples), x, y)
    assert bool({"While", "StatelessWhile"} & types) == loops
    assert keras_adr.ADRModel.from_config(model.get_config()).adr_config.attack.unroll == unroll
