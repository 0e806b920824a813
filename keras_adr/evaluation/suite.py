"""The default evaluation suite: the worst case per example over a list of attacks.

The headline number is the *worst-case robust accuracy*: the fraction of
examples that are classified correctly clean *and* under every attack run,
including every random restart of every attack. It is combined per example,
not as the minimum of the per-attack accuracies: if PGD fools examples {0, 1}
and APGD fools {2}, all three count as broken (`specs.worst_case_correct`).

By default each attack runs only on the examples that are still standing
(classified correctly clean and under every earlier attack), AutoAttack's
rule: the worst case needs nothing else, and a robust model's evaluation
then costs about a fraction `robust accuracy` of running every attack on
every example. Each attack's reported accuracy is then the accuracy *after*
it. `EvalConfig.standalone_attacks=True` runs every attack on every example,
for comparing the attacks themselves.

How an evaluation runs is one `keras_adr.specs.EvalConfig` (threat model,
attacks, restarts, examples, seed, batch size, APGD-T targets, pixel range,
precision of a model loaded from a path). `evaluate_robustness` and
`epsilon_sweep` take it as `config=`, or build it from the same names as
keyword arguments; with both, the keyword arguments override the config's
fields.

The model always runs in inference mode: Keras models are called with
`training=False`; SavedModels through their `serving_default` signature.
"""

import dataclasses
import logging
import math
import time

import numpy as np
import tensorflow as tf

from keras_adr import attacks as attacks_lib
from keras_adr import config as config_lib
from keras_adr import specs
from keras_adr.evaluation import loading
from keras_adr.evaluation.results import RobustnessResult, SweepResult
from keras_adr.specs import EvalConfig

# The "large" epsilon of the sanity check, as a fraction of the pixel range
# (L-inf; times sqrt(number of pixels) for L2).
LARGE_EPSILON_FRACTION = 0.5

_FIELDS = tuple(f.name for f in dataclasses.fields(EvalConfig))

_log = logging.getLogger(__name__)


def eval_config(config=None, /, *, caller="evaluate_robustness", **options):
    """The `EvalConfig` of a call: `config` with `options` overriding its fields.

    Args:
        config: An `EvalConfig`, or None (then one is built from `options`).
        caller: The function's name, for the error of an unknown argument.
        **options: `EvalConfig` fields.

    Raises:
        TypeError: For an argument that is not an `EvalConfig` field.
        ValueError: For an invalid value (see `EvalConfig`).
    """
    unknown = sorted(set(options) - set(_FIELDS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {unknown}; the evaluation's "
            f"options are the EvalConfig fields {list(_FIELDS)}."
        )
    if config is None:
        return EvalConfig(**options)
    if not isinstance(config, EvalConfig):
        raise ValueError(f"`config` must be a keras_adr.specs.EvalConfig; got {config!r}.")
    return config.replace(**options) if options else config


def _correct(model_fn, images, labels):
    logits = model_fn(images)
    return tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)


def _attack_fn(model_fn, spec, *, config, image_shape):
    """A `tf.function` (x, y, seed) -> correct `[B]` after every restart of `spec`."""
    epsilon, restarts = config.epsilon, config.restarts
    clip_min, clip_max = config.clip_min, config.clip_max
    common = dict(epsilon=epsilon, norm=config.norm, clip_min=clip_min, clip_max=clip_max)

    def correct_under_attack(x, y, seed):
        if epsilon == 0:
            # The identity attack: exercises the same compiled path, so the
            # epsilon-0 check catches a stochastic or training-mode model.
            return _correct(model_fn, tf.clip_by_value(x, clip_min, clip_max), y)
        if spec.kind == "fgsm":
            return _correct(model_fn, attacks_lib.fgsm(model_fn, x, y, **common), y)
        if spec.kind == "apgd":
            x_adv = attacks_lib.apgd(
                model_fn,
                x,
                y,
                steps=spec.steps,
                loss=spec.loss,
                targeted=spec.targeted,
                num_targets=config.apgd_targets,
                restarts=restarts,
                seed=seed,
                **common,
            )
            return _correct(model_fn, x_adv, y)

        def restart(r, correct):
            x_adv = attacks_lib.pgd(
                model_fn,
                x,
                y,
                steps=spec.steps,
                random_start=True,
                step_size=config_lib.pgd_step_size(epsilon, spec.steps),
                **common,
            )
            return r + 1, tf.logical_and(correct, _correct(model_fn, x_adv, y))

        _, correct = tf.while_loop(
            lambda r, _: r < restarts,
            restart,
            (tf.constant(0), tf.ones_like(y, tf.bool)),
            parallel_iterations=1,
        )
        return correct

    signature = [
        tf.TensorSpec((None, *image_shape), tf.float32, name="images"),
        tf.TensorSpec((None,), tf.int32, name="labels"),
        tf.TensorSpec((), tf.int64, name="seed"),
    ]
    return tf.function(correct_under_attack, input_signature=signature)


def _batch_seed(seed, attack_index, batch_index, rng):
    if seed is None:
        return np.int64(rng.integers(0, 2**62))
    return np.int64((seed * 1_000 + attack_index) * 1_000_000 + batch_index)


def evaluate_robustness(model, data, config=None, *, progress=None, **options):
    """Evaluates a model against a suite of attacks; the worst case per example.

    Args:
        model: A Keras model (called with `training=False`), a `LoadedModel`
            (see `load_model`), a model path (loaded in `config.precision`),
            or a callable images -> logits (the caller keeps it in inference
            mode).
        data: A `tf.data.Dataset` of `(images, labels)` (batched or not), or
            a tuple `(images, labels)` of arrays. Images are floats in
            `[clip_min, clip_max]`.
        config: An `EvalConfig`. Without one, `epsilon` is required and the
            other fields default as in `EvalConfig`.
        progress: None, or a callable `progress(done, total)` called after
            each batch of the clean pass and of every attack, with the
            number of batches done and to do (e.g. to drive a
            `keras.utils.Progbar`).
        **options: `EvalConfig` fields (`epsilon`, `norm`, `attacks`,
            `restarts`, `num_examples`, `seed`, `batch_size`, `apgd_targets`,
            `clip_min`, `clip_max`, `precision`), overriding `config`'s. An
            example counts as robust only if every run of every attack fails.
            `seed` seeds the random starts (`tf.random.set_seed(seed)`, a
            global side effect, for PGD; stateless per-batch seeds for APGD);
            None draws fresh randomness.

    Returns:
        A `RobustnessResult`.

    Raises:
        TypeError: Without `config` or `epsilon`, or for an unknown option.
        ValueError: For invalid options, a suite without PGD and APGD,
            images outside the pixel range, or labels outside the logits.
    """
    if config is None and "epsilon" not in options:
        raise TypeError("evaluate_robustness() needs `epsilon` (or an EvalConfig as `config`).")
    config = eval_config(config, **options)
    model_fn = loading.as_model_fn(model, config.precision)
    x, y = loading.materialise(data, config.num_examples, config.clip_min, config.clip_max)
    return _evaluate_arrays(model_fn, x, y, config, progress=progress)


def _evaluate_arrays(model_fn, x, y, config, progress=None):
    specs_ = specs.parse_suite(config.attacks)
    seed, batch_size = config.seed, config.batch_size
    if seed is not None:
        tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    image_shape = tuple(x.shape[1:])
    starts = range(0, len(x), batch_size)
    done, total = 0, len(starts) * (1 + len(specs_))

    def advance():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    clean_fn = tf.function(
        lambda images, labels: _correct(model_fn, images, labels),
        input_signature=[
            tf.TensorSpec((None, *image_shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ],
    )
    first_logits = model_fn(tf.constant(x[:1]))
    if first_logits.shape.rank != 2:
        raise ValueError(
            f"The model must return logits [batch, classes]; got shape {first_logits.shape}."
        )
    num_classes = first_logits.shape[-1]
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Labels must be in [0, {num_classes}) (the model's logits); they "
            f"span [{y.min()}, {y.max()}]."
        )
    clean_correct = []
    for i in starts:
        clean_correct.append(clean_fn(x[i : i + batch_size], y[i : i + batch_size]).numpy())
        advance()
    clean_correct = np.concatenate(clean_correct)

    attack_correct, attack_seconds, attacked = {}, {}, {}
    standing = clean_correct.copy()  # correct clean and under every attack so far
    for attack_index, spec in enumerate(specs_):
        fn = _attack_fn(model_fn, spec, config=config, image_shape=image_shape)
        # The worst case needs an attack only where nothing has broken the
        # example yet: an example already wrong stays wrong.
        indices = np.arange(len(x)) if config.standalone_attacks else np.flatnonzero(standing)
        correct = np.zeros(len(x), bool)
        start = time.perf_counter()
        batches = range(0, len(indices), batch_size)
        for batch_index, i in enumerate(batches):
            batch = indices[i : i + batch_size]
            batch_seed = _batch_seed(seed, attack_index, batch_index, rng)
            correct[batch] = fn(x[batch], y[batch], batch_seed).numpy()
            advance()
        for _ in range(len(starts) - len(batches)):  # the batches the cascade skipped
            advance()
        attack_seconds[spec.name] = time.perf_counter() - start
        attacked[spec.name] = len(indices)
        standing &= correct
        attack_correct[spec.name] = correct if config.standalone_attacks else standing.copy()
        _log.info(
            "epsilon=%g %s: accuracy%s %.4f on %d attacked examples (%.1fs)",
            config.epsilon,
            spec.name,
            "" if config.standalone_attacks else " after it",
            attack_correct[spec.name].mean(),
            len(indices),
            attack_seconds[spec.name],
        )

    robust_correct = specs.worst_case_correct(clean_correct, attack_correct)
    return RobustnessResult(
        epsilon=config.epsilon,
        norm=config.norm,
        attacks=tuple(s.name for s in specs_),
        restarts=config.restarts,
        num_examples=len(x),
        clean_accuracy=float(clean_correct.mean()),
        attack_accuracy={k: float(v.mean()) for k, v in attack_correct.items()},
        robust_accuracy=float(robust_correct.mean()),
        clean_correct=clean_correct,
        attack_correct=attack_correct,
        robust_correct=robust_correct,
        attack_seconds=attack_seconds,
        image_shape=image_shape,
        clip_min=config.clip_min,
        clip_max=config.clip_max,
        apgd_targets=config.apgd_targets,
        seed=seed,
        standalone_attacks=config.standalone_attacks,
        attacked_examples=attacked,
    )


def large_epsilon(norm, image_shape, clip_min=0.0, clip_max=1.0):
    """The epsilon at which a sound attack must leave robust accuracy near 0.

    L-inf: half the pixel range (0.5 on [0, 1] images), enough to turn any
    image into flat mid-grey. L2: the radius of the L2 ball that contains
    that L-inf ball, `0.5 * range * sqrt(H * W * C)`.
    """
    radius = LARGE_EPSILON_FRACTION * (clip_max - clip_min)
    if norm == "l2":
        radius *= math.sqrt(math.prod(image_shape))
    return radius


def epsilon_sweep(
    model,
    data,
    epsilons,
    config=None,
    *,
    headline_epsilon=None,
    include_sanity_epsilons=True,
    **options,
):
    """Evaluates the same examples at several epsilons.

    Args:
        model: As `evaluate_robustness`.
        data: As `evaluate_robustness`.
        epsilons: Epsilons (>= 0) to evaluate.
        config: An `EvalConfig`; each evaluation uses it with its epsilon
            replaced. Its epsilon is the headline (and is evaluated) unless
            `headline_epsilon` is given.
        headline_epsilon: The epsilon of the headline number; added to the
            sweep if missing. Default: `config`'s (or the `epsilon` option)
            if given, else the largest of `epsilons`.
        include_sanity_epsilons: Also evaluate epsilon 0 and `large_epsilon`
            (0.5 for L-inf on [0, 1] images), which the sanity checks need.
        **options: `EvalConfig` fields, as for `evaluate_robustness`.

    Returns:
        A `SweepResult` with one `RobustnessResult` per distinct epsilon,
        sorted by epsilon.

    Raises:
        ValueError: As `evaluate_robustness`, or for an empty `epsilons`.
    """
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, (list, tuple, np.ndarray)):
        raise ValueError(f"`epsilons` must be a list of numbers; got {epsilons!r}.")
    if headline_epsilon is None and (config is not None or "epsilon" in options):
        headline_epsilon = options.get("epsilon", getattr(config, "epsilon", None))
    config = eval_config(config, caller="epsilon_sweep", **options)
    epsilons = list(epsilons)
    if headline_epsilon is not None:
        epsilons.append(headline_epsilon)
    if not epsilons and not include_sanity_epsilons:
        raise ValueError("`epsilons` is empty.")
    configs = [config.replace(epsilon=epsilon) for epsilon in epsilons]  # Validates each.
    if headline_epsilon is None and any(c.epsilon > 0 for c in configs):
        headline_epsilon = max(c.epsilon for c in configs)
    model_fn = loading.as_model_fn(model, config.precision)
    x, y = loading.materialise(data, config.num_examples, config.clip_min, config.clip_max)
    values = [c.epsilon for c in configs]
    if include_sanity_epsilons:
        values += [0.0, large_epsilon(config.norm, x.shape[1:], config.clip_min, config.clip_max)]
    distinct = []
    for epsilon in sorted(values):
        if not any(math.isclose(epsilon, d, rel_tol=1e-9, abs_tol=1e-12) for d in distinct):
            distinct.append(epsilon)
    results = [
        _evaluate_arrays(model_fn, x, y, config.replace(epsilon=epsilon)) for epsilon in distinct
    ]
    return SweepResult(results, headline_epsilon=headline_epsilon)
