"""AutoAttack (Croce & Hein, ICML 2020) in TensorFlow, and RobustBench-format results.

`autoattack` runs a suite of attacks in AutoAttack's order, each only on the
points that every earlier attack left robust; a point counts as robust only
if it is classified correctly clean and survives every attack. Versions:

- `"standard"`: APGD-CE (100 steps, 1 run), APGD-T (targeted DLR, 9 target
  classes, 100 steps), FAB-T (9 target classes, 100 steps) and Square (5,000
  queries, p_init 0.8), in the threat model's norm (L-inf or L2). The target
  counts are capped at the number of classes minus one.
- `"rand"`: APGD-CE and APGD-DLR, for randomized defenses, each step on the
  gradient averaged over 20 samples of the model (EOT, `eot_iterations=20`
  of `attacks.apgd`), as AutoAttack's rand version.
- `"custom"`: the attacks named in `attacks`, in that order.

`keras_adr.evaluation.autoattack` is this module's `autoattack`; its result
is a `keras_adr.evaluation.AutoAttackResult`.

AutoAttack's own checks on the model join the result (`checks`): the fraction
of the first batch's points whose input gradient is exactly zero (a sign of
gradient masking), and how many points Square broke after the white-box
attacks had failed on them (black-box success where white-box attacks fail
also points to masking). `keras_adr.evaluation.sanity_checks` of the result
turns them into pass / fail checks, as for the default suite.
"""

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from keras_adr import attacks as attacks_lib
from keras_adr.evaluation import loading
from keras_adr.evaluation.results import AutoAttackResult

VERSIONS = ("standard", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND_ATTACKS = ("apgd-ce", "apgd-dlr")
# AutoAttack's standard version: 100 iterations, 9 target classes, 5,000 queries.
STEPS = 100
TARGETS = 9
# AutoAttack's rand version: APGD's gradient averaged over 20 samples of the model (EOT).
RAND_EOT_ITERATIONS = 20
SQUARE_QUERIES = attacks_lib.SQUARE_DEFAULT_QUERIES
_WHITE_BOX = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")

_log = logging.getLogger(__name__)


def _attack_fn(
    model_fn,
    name,
    *,
    epsilon,
    norm,
    steps,
    targets,
    queries,
    eot_iterations,
    clip_min,
    clip_max,
    image_shape,
):
    """A `tf.function` (x, y, seed) -> x_adv running one attack of the suite."""
    common = dict(epsilon=epsilon, norm=norm, clip_min=clip_min, clip_max=clip_max)
    apgd_args = dict(steps=steps, eot_iterations=eot_iterations, **common)

    def run(x, y, seed):
        if name == "apgd-ce":
            return attacks_lib.apgd(model_fn, x, y, loss="ce", seed=seed, **apgd_args)
        if name == "apgd-dlr":
            return attacks_lib.apgd(model_fn, x, y, loss="dlr", seed=seed, **apgd_args)
        if name == "apgd-t":
            return attacks_lib.apgd(
                model_fn,
                x,
                y,
                loss="dlr",
                targeted=True,
                num_targets=targets,
                seed=seed,
                **apgd_args,
            )
        if name == "fab-t":
            return attacks_lib.fab(
                model_fn, x, y, steps=steps, num_targets=targets, seed=seed, **common
            )
        return attacks_lib.square(model_fn, x, y, queries=queries, seed=seed, **common)

    signature = [
        tf.TensorSpec((None, *image_shape), tf.float32),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((), tf.int64),
    ]
    return tf.function(run, input_signature=signature)


def _predict(model_fn, x, batch_size):
    return np.concatenate(
        [
            np.argmax(np.asarray(model_fn(tf.constant(x[i : i + batch_size]))), -1)
            for i in range(0, len(x), batch_size)
        ]
    )


def _zero_gradient_fraction(model_fn, x, y):
    """Fraction of points whose cross-entropy input gradient is exactly zero."""

    @tf.function  # Eager gradients through a SavedModel signature break later traces.
    def fraction(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(model_fn(x), tf.float32)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grad = tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = tf.reshape(grad, [tf.shape(grad)[0], -1])
        return tf.reduce_mean(tf.cast(tf.reduce_all(flat == 0, axis=1), tf.float32))

    return float(fraction(tf.constant(x), tf.constant(y)))


def _suite(version, attacks):
    if version not in VERSIONS:
        raise ValueError(f"`version` must be one of {VERSIONS}; got {version!r}.")
    if version != "custom":
        if attacks is not None:
            raise ValueError(
                f"`attacks` is only for version='custom'; version={version!r} runs its own suite."
            )
        names = STANDARD_ATTACKS if version == "standard" else RAND_ATTACKS
    else:
        if isinstance(attacks, str) or not attacks:
            raise ValueError(
                f"`attacks` must be a non-empty list of {ATTACKS} with "
                f"version='custom'; got {attacks!r}."
            )
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"Unknown AutoAttack attack(s) {unknown}; valid: {ATTACKS}.")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"`attacks` has duplicate names: {list(attacks)}.")
        names = tuple(attacks)
    return names


def autoattack(
    model_fn,
    x,
    y=None,
    *,
    epsilon,
    norm="linf",
    version="standard",
    attacks=None,
    seed=0,
    batch_size=128,
    num_examples=None,
    steps=STEPS,
    targets=TARGETS,
    queries=SQUARE_QUERIES,
    clip_min=0.0,
    clip_max=1.0,
    progress=True,
):
    """Runs AutoAttack's suite; each attack only on the points still robust.

    Args:
        model_fn: A Keras model (run with `training=False`), a
            `evaluation.LoadedModel`, a model path, or a callable images ->
            logits (the caller keeps it in inference mode).
        x: Float images `[N, ...]` in `[clip_min, clip_max]`, or a
            `tf.data.Dataset` of `(images, labels)` (then `y` is None).
        y: Integer labels `[N]`.
        epsilon: Radius of the threat model, > 0.
        norm: `"linf"` or `"l2"`.
        version: `"standard"`, `"rand"` or `"custom"` (see the module
            docstring).
        attacks: With `version="custom"`, names from `ATTACKS` in the order
            to run; None otherwise.
        seed: Integer seed of every attack's randomness, or None.
        batch_size: Examples per attack call.
        num_examples: Evaluate only the first `num_examples` examples.
        steps: Iterations of APGD and FAB (AutoAttack: 100).
        targets: Target classes of APGD-T and FAB-T (AutoAttack: 9), capped at
            the number of classes - 1.
        queries: Square's query budget (AutoAttack: 5,000).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        progress: Show a progress bar per attack.

    Returns:
        An `AutoAttackResult`.

    Raises:
        ValueError: For an invalid argument or data.
    """
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float, np.number))
        or not (0 < epsilon < np.inf)
    ):
        raise ValueError(f"`epsilon` must be a finite number > 0; got {epsilon!r}.")
    if norm not in ("linf", "l2"):
        raise ValueError(f"`norm` must be 'linf' or 'l2'; got {norm!r}.")
    for name, value in (
        ("batch_size", batch_size),
        ("steps", steps),
        ("targets", targets),
        ("queries", queries),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be None or an integer; got {seed!r}.")
    names = _suite(version, attacks)
    model_fn = loading.as_model_fn(model_fn)
    data = x if y is None else (x, y)
    x, y = loading.materialise(data, num_examples, clip_min, clip_max)
    num_classes = int(np.asarray(model_fn(tf.constant(x[:1]))).shape[-1])
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"Labels must be in [0, {num_classes}) (the model's logits); they span "
            f"[{y.min()}, {y.max()}]."
        )
    if num_classes < 4 and ("apgd-t" in names or "apgd-dlr" in names and num_classes < 3):
        raise ValueError(
            f"The model has {num_classes} classes; APGD-T's targeted DLR loss needs "
            "at least 4 (untargeted DLR 3): use version='custom' without it."
        )
    targets = min(targets, num_classes - 1)
    epsilon = float(epsilon)
    rng = np.random.default_rng(seed)

    clean_correct = _predict(model_fn, x, batch_size) == y
    robust = clean_correct.copy()
    broken_by = np.where(clean_correct, "", "clean").astype(object)
    x_adv = x.copy()
    accuracy_after, attack_seconds = {}, {}
    checks = {
        "zero_gradient_fraction": _zero_gradient_fraction(model_fn, x[:batch_size], y[:batch_size]),
        "zero_gradient_examples": min(batch_size, len(x)),
    }
    if checks["zero_gradient_fraction"] > 0:
        _log.warning(
            "%.1f%% of the points have a zero input gradient: the white-box attacks "
            "cannot work there (gradient masking?).",
            100 * checks["zero_gradient_fraction"],
        )
    for attack_index, name in enumerate(names):
        todo = np.flatnonzero(robust)
        start = time.perf_counter()
        fn = _attack_fn(
            model_fn,
            name,
            epsilon=epsilon,
            norm=norm,
            steps=steps,
            targets=targets,
            queries=queries,
            eot_iterations=RAND_EOT_ITERATIONS if version == "rand" else 1,
            clip_min=clip_min,
            clip_max=clip_max,
            image_shape=x.shape[1:],
        )
        bar = (
            keras.utils.Progbar(len(todo), unit_name="example", verbose=1 if progress else 0)
            if len(todo)
            else None
        )
        for batch_index, i in enumerate(range(0, len(todo), batch_size)):
            index = todo[i : i + batch_size]
            batch_seed = (
                np.int64(rng.integers(0, 2**62))
                if seed is None
                else np.int64((seed * 1_000 + attack_index) * 1_000_000 + batch_index)
            )
            adv = fn(x[index], y[index], batch_seed).numpy()
            delta = (adv - x[index]).reshape(len(index), -1)
            size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
            # AutoAttack's final check: a point outside the ball does not count.
            inside = size <= epsilon * (1 + 1e-5) + 1e-7
            fooled = (_predict(model_fn, adv, batch_size) != y[index]) & inside
            robust[index[fooled]] = False
            broken_by[index[fooled]] = name
            x_adv[index[fooled]] = adv[fooled]
            if bar is not None:
                bar.add(len(index), values=[("robust", float(robust.mean()))])
        attack_seconds[name] = time.perf_counter() - start
        accuracy_after[name] = float(robust.mean())
        _log.info(
            "AutoAttack %s: robust accuracy %.4f (%.1fs)",
            name,
            accuracy_after[name],
            attack_seconds[name],
        )
    if "square" in names and any(n in _WHITE_BOX for n in names[: names.index("square")]):
        checks["square_after_white_box"] = int(np.sum(broken_by == "square"))
        if checks["square_after_white_box"]:
            _log.warning(
                "Square broke %d points that the white-box attacks left robust: their "
                "gradients may be masked.",
                checks["square_after_white_box"],
            )
    return AutoAttackResult(
        epsilon=epsilon,
        norm=norm,
        version=version,
        attacks=names,
        clean_correct=clean_correct,
        robust_correct=robust,
        broken_by=broken_by.astype(str),
        accuracy_after=accuracy_after,
        attack_seconds=attack_seconds,
        x_adv=x_adv,
        checks=checks,
        seed=seed,
    )
