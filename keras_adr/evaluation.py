"""Robustness evaluation: a suite of attacks, the worst case per example, sanity checks.

The headline number is the *worst-case robust accuracy*: the fraction of
examples that are classified correctly clean *and* under every attack run,
including every random restart of every attack. It is combined per example,
not as the minimum of the per-attack accuracies: if PGD fools examples {0, 1}
and APGD fools {2}, all three count as broken. A suite must contain at least
one PGD attack and one APGD attack, so that no report claims robustness from a
single-step or a single weak attack.

The model always runs in inference mode: Keras models are called with
`training=False`; SavedModels through their `serving_default` signature.

Attack names:

- `"fgsm"`: one signed-gradient step of size epsilon (deterministic: one run).
- `"pgd<N>"` (`"pgd20"`, `"pgd100"`): N steps of PGD on the cross-entropy,
  step size `2.5 * epsilon / N` (Madry et al. 2018), each restart from a
  fresh uniform random start.
- `"apgd_ce"`, `"apgd_dlr"`, `"apgd_dlr_t"`, optionally followed by the number
  of steps (`"apgd_ce50"`; default 100): Auto-PGD on the cross-entropy, the
  DLR loss, or the targeted DLR loss over `apgd_targets` target classes
  (Croce & Hein 2020).

Gradient-masking sanity checks (`sanity_checks`) look for the usual signs of
an evaluation that is too weak (Athalye et al. 2018, Carlini et al. 2019):

- `epsilon_zero_equals_clean`: at epsilon 0 the attack pipeline classifies
  every example as the clean pass does (exact, per example).
- `non_increasing_in_epsilon`: robust accuracy does not rise with epsilon.
- `more_pgd_steps_not_weaker`: PGD with more steps is not weaker than PGD with
  fewer, on the raw per-attack accuracies.
- `iterative_not_weaker_than_fgsm`: iterative cross-entropy attacks are not
  weaker than FGSM.
- `near_zero_at_large_epsilon`: at a large epsilon (0.5 of the pixel range for
  L-inf, which lets the attack turn every image into flat grey) robust
  accuracy is at most 10%.
- `attack_suite`: the worst case covers a PGD and an APGD attack.

The comparisons between two accuracies allow `comparison_tolerance(n)`: half
a percentage point, and at least one example. Random starts differ between
runs, so a sound evaluation may lose or gain an example or two; gradient
masking shows as far larger gaps.

Example:

```python
model = evaluation.load_model("saved_models/fashion_mnist")  # or a .keras file
test = keras_adr.data.load("fashion_mnist", "test", batch_size=256, take=1000)
sweep = evaluation.epsilon_sweep(model, test, [0.05, 0.1, 0.2], headline_epsilon=0.1)
checks = evaluation.sanity_checks(sweep)
evaluation.write_report(sweep, "runs/eval", checks=checks)
print(evaluation.format_summary(sweep, checks))
```
"""

import dataclasses
import json
import logging
import math
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf

from keras_adr import attacks as attacks_lib
from keras_adr import config as config_lib
from keras_adr import export, layers
from keras_adr.config import NORMS

# The "large" epsilon of the sanity check, as a fraction of the pixel range
# (L-inf; times sqrt(number of pixels) for L2), and the highest robust
# accuracy a sound attack may leave there.
LARGE_EPSILON_FRACTION = 0.5
NEAR_ZERO_ACCURACY = 0.10
# Slack of the comparisons between two accuracies: see comparison_tolerance.
COMPARISON_TOLERANCE = 0.005

REPORT_JSON = "results.json"
REPORT_MARKDOWN = "results.md"
REPORT_PLOT = "robust_accuracy_vs_epsilon.png"

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

_ATTACK_RE = re.compile(r"^(?:(fgsm)|pgd(\d+)|(apgd_ce|apgd_dlr_t|apgd_dlr)(\d+)?)$")
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

_log = logging.getLogger(__name__)


class SanityCheckError(RuntimeError):
    """A gradient-masking sanity check failed: the evaluation is not trustworthy."""


# --- Attacks -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A parsed attack name.

    Attributes:
        name: The name, e.g. `"pgd20"`.
        kind: `"fgsm"`, `"pgd"` or `"apgd"`.
        steps: Iterations (1 for FGSM).
        loss: `"ce"` or `"dlr"`.
        targeted: Whether it is the targeted APGD-T.
    """

    name: str
    kind: str
    steps: int
    loss: str = "ce"
    targeted: bool = False

    @property
    def randomized(self):
        """Whether restarts draw different random starts (all but FGSM)."""
        return self.kind != "fgsm"


def parse_attack(name):
    """Parses an attack name (see the module docstring) into an `AttackSpec`.

    Raises:
        ValueError: For an unknown name or zero steps.
    """
    match = _ATTACK_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"Unknown attack {name!r}. Valid attacks: 'fgsm', 'pgd<steps>' (e.g. 'pgd20'), "
            "'apgd_ce', 'apgd_dlr', 'apgd_dlr_t', optionally with steps (e.g. 'apgd_ce50')."
        )
    fgsm, pgd_steps, apgd_name, apgd_steps = match.groups()
    if fgsm:
        return AttackSpec(name, "fgsm", 1)
    steps = int(pgd_steps if pgd_steps is not None else apgd_steps or config_lib.APGD_STEPS)
    if steps < 1:
        raise ValueError(f"Attack {name!r} must have at least 1 step.")
    if pgd_steps is not None:
        return AttackSpec(name, "pgd", steps)
    loss = "ce" if apgd_name == "apgd_ce" else "dlr"
    return AttackSpec(name, "apgd", steps, loss=loss, targeted=apgd_name == "apgd_dlr_t")


def parse_suite(names):
    """Parses and checks an attack suite: it must hold a PGD and an APGD attack.

    Returns:
        A list of `AttackSpec`.

    Raises:
        ValueError: For unknown or duplicate names, or a suite too weak to
            support a robustness claim.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"`attacks` must be a non-empty list of attack names; got {names!r}.")
    specs = [parse_attack(name) for name in names]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"`attacks` has duplicate names: {list(names)}.")
    kinds = {s.kind for s in specs}
    if "pgd" not in kinds or "apgd" not in kinds:
        raise ValueError(
            f"The attack suite {list(names)} is too weak to support a robustness claim: it "
            "must include at least one PGD attack (e.g. 'pgd20') and one APGD attack (e.g. "
            "'apgd_ce'). The headline is the worst case over all attacks run."
        )
    return specs


def worst_case_correct(*correct):
    """Per-example worst case: correct only where correct under every attack.

    Args:
        *correct: Boolean arrays `[N]` (one attack or the clean pass) or
            `[R, N]` (R restarts of one attack), or mappings of name -> such
            arrays.

    Returns:
        A boolean numpy array `[N]`: the logical AND over everything given.

    Raises:
        ValueError: If nothing is given or the example counts differ.
    """
    arrays = []
    for item in correct:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            value = np.asarray(value)
            if value.dtype != bool:
                raise ValueError(f"Expected boolean arrays; got dtype {value.dtype}.")
            arrays.append(value.reshape(-1, value.shape[-1]) if value.ndim else value[None, None])
    if not arrays:
        raise ValueError("worst_case_correct needs at least one array.")
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"All arrays must cover the same examples; got sizes {sorted(sizes)}.")
    return np.logical_and.reduce(np.concatenate(arrays, axis=0), axis=0)


# --- Models ------------------------------------------------------------------


class LoadedModel:
    """A callable images -> logits over a Keras model or a SavedModel.

    Attributes:
        kind: `"keras"` or `"saved_model"`.
        path: Where it was loaded from (None for an in-memory model).
        num_classes: Number of logits, when known.
    """

    def __init__(self, fn, kind, path=None, keep_alive=None, num_classes=None):
        self._fn = fn
        self.kind = kind
        self.path = path
        self.num_classes = num_classes
        # A SavedModel's signature needs its loaded object (and variables)
        # alive for as long as it is called.
        self._keep_alive = keep_alive

    def __call__(self, images):
        return self._fn(images)

    def __repr__(self):
        return f"LoadedModel(kind={self.kind!r}, path={self.path!r})"


def resolve_model_path(path):
    """Resolves a model path: a `.keras` file, a SavedModel or a TF Serving base dir.

    A TF Serving base directory (integer-named version subdirectories)
    resolves to its highest version.

    Returns:
        `(kind, path)` with kind `"keras"` or `"saved_model"`.

    Raises:
        FileNotFoundError: If nothing loadable is at `path`.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return "keras", path
        raise FileNotFoundError(
            f"{path} is a file but not a '.keras' model; pass a .keras file, a SavedModel "
            "directory or a TF Serving base directory."
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No model at {path}.")
    if any(os.path.isfile(os.path.join(path, f)) for f in _SAVED_MODEL_FILES):
        return "saved_model", path
    versions = export.list_versions(path)
    if versions:
        return resolve_model_path(os.path.join(path, str(versions[-1])))
    raise FileNotFoundError(
        f"{path} is neither a SavedModel (no saved_model.pb) nor a TF Serving base directory "
        "(no integer-named version subdirectory)."
    )


def load_model(path, precision="float32"):
    """Loads a model for evaluation as a callable images -> logits.

    Args:
        path: A `.keras` file (called with `training=False`), a SavedModel
            directory (its `serving_default` signature, output `logits`), or
            a TF Serving base directory (its highest version).
        precision: The Keras dtype policy in which a `.keras` model's layers
            compute, whatever it was trained in (`keras_adr.precision.POLICIES`;
            default float32). A SavedModel computes in the precision it was
            exported with (float32 for `adr-train`'s), so it takes only float32.

    Returns:
        A `LoadedModel`.

    Raises:
        FileNotFoundError: If nothing loadable is at `path`.
        ValueError: If a SavedModel has no `serving_default` signature with a
            `logits` output, or `precision` is not float32 for a SavedModel.
    """
    from keras_adr import precision as precision_lib

    if precision not in precision_lib.POLICIES:
        raise ValueError(
            f"`precision` must be one of {', '.join(precision_lib.POLICIES)}; got {precision!r}."
        )
    kind, resolved = resolve_model_path(path)
    if kind == "keras":
        import keras_adr  # noqa: F401 - registers the custom objects.

        model = precision_lib.with_policy(
            keras.models.load_model(resolved, compile=False), precision
        )
        num_classes = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
        return LoadedModel(
            lambda images: model(images, training=False),
            "keras",
            resolved,
            keep_alive=model,
            num_classes=num_classes,
        )
    if precision != "float32":
        raise ValueError(
            f"precision={precision} (--precision) applies to .keras models; the SavedModel "
            f"{resolved} computes in the precision it was exported with. Drop --precision."
        )
    loaded = tf.saved_model.load(resolved)
    signatures = getattr(loaded, "signatures", {})
    if export.SERVING_DEFAULT not in signatures:
        raise ValueError(
            f"The SavedModel at {resolved} has no {export.SERVING_DEFAULT!r} signature; it "
            f"has {sorted(signatures)}."
        )
    signature = signatures[export.SERVING_DEFAULT]
    outputs = signature.structured_outputs
    if not isinstance(outputs, dict) or export.OUTPUT_LOGITS not in outputs:
        raise ValueError(
            f"The {export.SERVING_DEFAULT!r} signature of {resolved} has no "
            f"{export.OUTPUT_LOGITS!r} output; outputs: {outputs}."
        )
    _, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        raise ValueError(
            f"The {export.SERVING_DEFAULT!r} signature of {resolved} must take one input "
            f"(images); it takes {sorted(kwargs)}."
        )
    (input_name,) = kwargs
    num_classes = outputs[export.OUTPUT_LOGITS].shape[-1]

    def logits(images):
        return signature(**{input_name: tf.cast(images, tf.float32)})[export.OUTPUT_LOGITS]

    return LoadedModel(logits, "saved_model", resolved, keep_alive=loaded, num_classes=num_classes)


def _as_model_fn(model):
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, keras.layers.Layer):
        return attacks_lib.inference_fn(model)
    if not callable(model):
        raise ValueError(
            "`model` must be a Keras model, a LoadedModel, a path, or a callable images -> "
            f"logits; got {type(model).__name__}."
        )
    return model


# --- Data --------------------------------------------------------------------


def _materialise(data, num_examples, clip_min, clip_max):
    """Returns the (first `num_examples`) examples as float32 / int32 numpy arrays."""
    if isinstance(data, tf.data.Dataset):
        images_spec = data.element_spec[0] if isinstance(data.element_spec, tuple) else None
        if images_spec is None or len(data.element_spec) != 2:
            raise ValueError("A dataset must yield (images, labels) pairs.")
        if images_spec.shape.rank == 3:  # Unbatched examples.
            data = data.batch(256)
        xs, ys, count = [], [], 0
        for x, y in data:
            xs.append(np.asarray(x))
            ys.append(np.asarray(y).reshape(-1))
            count += len(ys[-1])
            if num_examples is not None and count >= num_examples:
                break
        if not xs:
            raise ValueError("The dataset is empty.")
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1]).reshape(-1)
    else:
        raise ValueError(
            "`data` must be a tf.data.Dataset of (images, labels) or a tuple "
            f"(images, labels) of arrays; got {type(data).__name__}."
        )
    if num_examples is not None:
        x, y = x[:num_examples], y[:num_examples]
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels.")
    if len(x) == 0:
        raise ValueError("No examples to evaluate.")
    layers.check_pixels(x, clip_min, clip_max, name="images")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Labels must be integers; got {y.dtype}.")
    return x.astype(np.float32), y.astype(np.int32)


# --- Results -----------------------------------------------------------------


@dataclasses.dataclass
class RobustnessResult:
    """The outcome of one evaluation at one epsilon.

    Attributes:
        epsilon: Radius of the threat model.
        norm: `"linf"` or `"l2"`.
        attacks: Attack names, in the order run.
        restarts: Random restarts per randomized attack.
        num_examples: Number of examples evaluated.
        clean_accuracy: Accuracy on the clean examples.
        attack_accuracy: `{attack: accuracy}`: per attack, the fraction of
            examples correctly classified after every restart.
        robust_accuracy: The worst case: correct clean and under every
            attack and restart.
        clean_correct: Boolean `[N]`.
        attack_correct: `{attack: boolean [N]}`.
        robust_correct: Boolean `[N]`.
        attack_seconds: `{attack: wall-clock seconds}`.
        image_shape: `(H, W, C)` of the images.
        clip_min: Smallest pixel value.
        clip_max: Largest pixel value.
        apgd_targets: Target classes of `apgd_dlr_t`.
        seed: The seed used.
    """

    epsilon: float
    norm: str
    attacks: tuple
    restarts: int
    num_examples: int
    clean_accuracy: float
    attack_accuracy: dict
    robust_accuracy: float
    clean_correct: np.ndarray
    attack_correct: dict
    robust_correct: np.ndarray
    attack_seconds: dict
    image_shape: tuple
    clip_min: float = 0.0
    clip_max: float = 1.0
    apgd_targets: int = config_lib.APGD_TARGETS
    seed: int = None

    def to_dict(self):
        """A JSON-serialisable summary (without the per-example arrays)."""
        return {
            "epsilon": self.epsilon,
            "norm": self.norm,
            "attacks": list(self.attacks),
            "restarts": self.restarts,
            "apgd_targets": self.apgd_targets,
            "num_examples": self.num_examples,
            "clean_accuracy": self.clean_accuracy,
            "attack_accuracy": dict(self.attack_accuracy),
            "robust_accuracy": self.robust_accuracy,
            "num_robust": int(self.robust_correct.sum()),
            "attack_seconds": {k: round(v, 3) for k, v in self.attack_seconds.items()},
            "image_shape": list(self.image_shape),
            "clip_min": self.clip_min,
            "clip_max": self.clip_max,
            "seed": self.seed,
        }


@dataclasses.dataclass
class SweepResult:
    """Evaluations of the same examples at several epsilons.

    Attributes:
        results: `RobustnessResult`s sorted by epsilon.
        headline_epsilon: The epsilon of the headline number, or None.
    """

    results: list
    headline_epsilon: float = None

    @property
    def epsilons(self):
        return [r.epsilon for r in self.results]

    @property
    def robust_accuracies(self):
        return [r.robust_accuracy for r in self.results]

    @property
    def headline(self):
        """The result at `headline_epsilon` (else the largest nonzero epsilon)."""
        for r in self.results:
            if self.headline_epsilon is not None and math.isclose(r.epsilon, self.headline_epsilon):
                return r
        nonzero = [r for r in self.results if r.epsilon > 0]
        return (nonzero or self.results)[-1]

    def to_dict(self):
        headline = self.headline
        return {
            "headline": {
                "epsilon": headline.epsilon,
                "robust_accuracy": headline.robust_accuracy,
                "clean_accuracy": headline.clean_accuracy,
                "num_examples": headline.num_examples,
            },
            "epsilons": self.epsilons,
            "robust_accuracies": self.robust_accuracies,
            "results": [r.to_dict() for r in self.results],
        }


def _as_sweep(results):
    if isinstance(results, SweepResult):
        return results
    if isinstance(results, RobustnessResult):
        return SweepResult([results], headline_epsilon=results.epsilon)
    if (
        isinstance(results, (list, tuple))
        and results
        and all(isinstance(r, RobustnessResult) for r in results)
    ):
        return SweepResult(sorted(results, key=lambda r: r.epsilon))
    raise ValueError(
        "Expected a RobustnessResult, a SweepResult or a list of RobustnessResult; got "
        f"{type(results).__name__}."
    )


# --- Evaluation --------------------------------------------------------------


def _check_args(*, epsilon, norm, restarts, num_examples, seed, batch_size, apgd_targets):
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float, np.number))
        or not (math.isfinite(epsilon) and epsilon >= 0)
    ):
        raise ValueError(f"`epsilon` must be a finite number >= 0; got {epsilon!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}; got {norm!r}.")
    for name, value, allow_none in (
        ("restarts", restarts, False),
        ("num_examples", num_examples, True),
        ("batch_size", batch_size, False),
        ("apgd_targets", apgd_targets, False),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be None or an integer; got {seed!r}.")


def _correct(model_fn, images, labels):
    logits = model_fn(images)
    return tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)


def _attack_fn(
    model_fn, spec, *, epsilon, norm, restarts, apgd_targets, clip_min, clip_max, image_shape
):
    """A `tf.function` (x, y, seed) -> correct `[B]` after every restart of `spec`."""
    common = dict(epsilon=epsilon, norm=norm, clip_min=clip_min, clip_max=clip_max)

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
                num_targets=apgd_targets,
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


def evaluate_robustness(
    model,
    data,
    *,
    epsilon,
    norm="linf",  # noqa: C901
    attacks=config_lib.EVAL_ATTACKS,
    restarts=config_lib.EVAL_RESTARTS,
    num_examples=None,
    seed=0,
    batch_size=config_lib.EVAL_BATCH_SIZE,
    apgd_targets=config_lib.APGD_TARGETS,
    clip_min=0.0,
    clip_max=1.0,
    progress=None,
):
    """Evaluates a model against a suite of attacks; the worst case per example.

    Args:
        model: A Keras model (called with `training=False`), a `LoadedModel`
            (see `load_model`), a model path, or a callable images -> logits
            (the caller keeps it in inference mode).
        data: A `tf.data.Dataset` of `(images, labels)` (batched or not), or
            a tuple `(images, labels)` of arrays. Images are floats in
            `[clip_min, clip_max]`.
        epsilon: Radius of the threat model, >= 0 (0 runs the identity attack).
        norm: `"linf"` or `"l2"`.
        attacks: Attack names (see the module docstring); must include a PGD
            and an APGD attack.
        restarts: Runs per randomized attack (PGD: fresh random starts; APGD:
            restarts per target class). An example counts as robust only if
            every run of every attack fails.
        num_examples: Evaluate only the first `num_examples` examples.
        seed: Seeds the random starts (`tf.random.set_seed(seed)`, a global
            side effect, for PGD; stateless per-batch seeds for APGD). None
            draws fresh randomness.
        batch_size: Examples per attack call.
        apgd_targets: Target classes of `apgd_dlr_t` (AutoAttack: 9).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        progress: None, or a callable `progress(done, total)` called after
            each batch of the clean pass and of every attack, with the
            number of batches done and to do (e.g. to drive a
            `keras.utils.Progbar`).

    Returns:
        A `RobustnessResult`.

    Raises:
        ValueError: For invalid arguments, a suite without PGD and APGD,
            images outside the pixel range, or labels outside the logits.
    """
    _check_args(
        epsilon=epsilon,
        norm=norm,
        restarts=restarts,
        num_examples=num_examples,
        seed=seed,
        batch_size=batch_size,
        apgd_targets=apgd_targets,
    )
    specs = parse_suite(attacks)
    if not clip_min < clip_max:
        raise ValueError(f"`clip_min` ({clip_min}) must be smaller than `clip_max` ({clip_max}).")
    model_fn = _as_model_fn(model)
    x, y = _materialise(data, num_examples, clip_min, clip_max)
    return _evaluate_arrays(
        model_fn,
        x,
        y,
        specs,
        epsilon=float(epsilon),
        norm=norm,
        restarts=restarts,
        seed=seed,
        batch_size=batch_size,
        apgd_targets=apgd_targets,
        clip_min=clip_min,
        clip_max=clip_max,
        progress=progress,
    )


def _evaluate_arrays(
    model_fn,
    x,
    y,
    specs,
    *,
    epsilon,
    norm,
    restarts,
    seed,
    batch_size,
    apgd_targets,
    clip_min,
    clip_max,
    progress=None,
):
    if seed is not None:
        tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    image_shape = tuple(x.shape[1:])
    starts = range(0, len(x), batch_size)
    done, total = 0, len(starts) * (1 + len(specs))

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
    num_classes = None
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

    attack_correct, attack_seconds = {}, {}
    for attack_index, spec in enumerate(specs):
        fn = _attack_fn(
            model_fn,
            spec,
            epsilon=epsilon,
            norm=norm,
            restarts=restarts,
            apgd_targets=apgd_targets,
            clip_min=clip_min,
            clip_max=clip_max,
            image_shape=image_shape,
        )
        start = time.perf_counter()
        correct = []
        for batch_index, i in enumerate(starts):
            batch_seed = _batch_seed(seed, attack_index, batch_index, rng)
            correct.append(fn(x[i : i + batch_size], y[i : i + batch_size], batch_seed).numpy())
            advance()
        attack_correct[spec.name] = np.concatenate(correct)
        attack_seconds[spec.name] = time.perf_counter() - start
        _log.info(
            "epsilon=%g %s: accuracy %.4f (%.1fs)",
            epsilon,
            spec.name,
            attack_correct[spec.name].mean(),
            attack_seconds[spec.name],
        )

    robust_correct = worst_case_correct(clean_correct, attack_correct)
    return RobustnessResult(
        epsilon=epsilon,
        norm=norm,
        attacks=tuple(s.name for s in specs),
        restarts=restarts,
        num_examples=len(x),
        clean_accuracy=float(clean_correct.mean()),
        attack_accuracy={k: float(v.mean()) for k, v in attack_correct.items()},
        robust_accuracy=float(robust_correct.mean()),
        clean_correct=clean_correct,
        attack_correct=attack_correct,
        robust_correct=robust_correct,
        attack_seconds=attack_seconds,
        image_shape=image_shape,
        clip_min=clip_min,
        clip_max=clip_max,
        apgd_targets=apgd_targets,
        seed=seed,
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
    *,
    headline_epsilon=None,
    include_sanity_epsilons=True,
    norm="linf",
    attacks=config_lib.EVAL_ATTACKS,
    restarts=config_lib.EVAL_RESTARTS,
    num_examples=None,
    seed=0,
    batch_size=config_lib.EVAL_BATCH_SIZE,
    apgd_targets=config_lib.APGD_TARGETS,
    clip_min=0.0,
    clip_max=1.0,
):
    """Evaluates the same examples at several epsilons.

    Args:
        model: As `evaluate_robustness`.
        data: As `evaluate_robustness`.
        epsilons: Epsilons (>= 0) to evaluate.
        headline_epsilon: The epsilon of the headline number; added to the
            sweep if missing. Default: the largest of `epsilons`.
        include_sanity_epsilons: Also evaluate epsilon 0 and `large_epsilon`
            (0.5 for L-inf on [0, 1] images), which the sanity checks need.
        norm, attacks, restarts, num_examples, seed, batch_size,
        apgd_targets, clip_min, clip_max: As `evaluate_robustness`.

    Returns:
        A `SweepResult` with one `RobustnessResult` per distinct epsilon,
        sorted by epsilon.

    Raises:
        ValueError: As `evaluate_robustness`, or for an empty `epsilons`.
    """
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, (list, tuple, np.ndarray)):
        raise ValueError(f"`epsilons` must be a list of numbers; got {epsilons!r}.")
    epsilons = list(epsilons)
    if headline_epsilon is not None:
        epsilons.append(headline_epsilon)
    if not epsilons and not include_sanity_epsilons:
        raise ValueError("`epsilons` is empty.")
    for epsilon in epsilons or [0.0]:
        _check_args(
            epsilon=epsilon,
            norm=norm,
            restarts=restarts,
            num_examples=num_examples,
            seed=seed,
            batch_size=batch_size,
            apgd_targets=apgd_targets,
        )
    if headline_epsilon is None and any(e > 0 for e in epsilons):
        headline_epsilon = float(max(epsilons))
    specs = parse_suite(attacks)
    model_fn = _as_model_fn(model)
    x, y = _materialise(data, num_examples, clip_min, clip_max)
    if include_sanity_epsilons:
        epsilons += [0.0, large_epsilon(norm, x.shape[1:], clip_min, clip_max)]
    distinct = []
    for epsilon in sorted(float(e) for e in epsilons):
        if not any(math.isclose(epsilon, d, rel_tol=1e-9, abs_tol=1e-12) for d in distinct):
            distinct.append(epsilon)
    results = [
        _evaluate_arrays(
            model_fn,
            x,
            y,
            specs,
            epsilon=epsilon,
            norm=norm,
            restarts=restarts,
            seed=seed,
            batch_size=batch_size,
            apgd_targets=apgd_targets,
            clip_min=clip_min,
            clip_max=clip_max,
        )
        for epsilon in distinct
    ]
    return SweepResult(results, headline_epsilon=headline_epsilon)


# --- Sanity checks -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SanityCheck:
    """The outcome of one sanity check.

    Attributes:
        name: The check's name.
        status: `"passed"`, `"failed"` or `"skipped"` (not enough results).
        message: What was compared, or why it was skipped.
    """

    name: str
    status: str
    message: str

    @property
    def passed(self):
        return self.status == PASSED

    @property
    def failed(self):
        return self.status == FAILED

    def to_dict(self):
        return dataclasses.asdict(self)


def comparison_tolerance(num_examples):
    """Slack of `accuracy_a <= accuracy_b`: 0.5 percentage point, at least one example."""
    return max(COMPARISON_TOLERANCE, 1.0 / num_examples)


def _check(name, violations, passed_message):
    if violations:
        return SanityCheck(name, FAILED, "; ".join(violations))
    return SanityCheck(name, PASSED, passed_message)


def _pct(value):
    return f"{100 * value:.2f}%"


def _check_suite(sweep):
    violations = []
    for r in sweep.results:
        kinds = {parse_attack(a).kind for a in r.attacks}
        if "pgd" not in kinds or "apgd" not in kinds:
            violations.append(
                f"epsilon {r.epsilon:g}: attacks {list(r.attacks)} lack a PGD or an APGD attack"
            )
    return _check(
        "attack_suite", violations, "every worst case covers at least one PGD and one APGD attack"
    )


def _check_pgd_steps(sweep):
    violations, compared = [], 0
    for r in sweep.results:
        if r.epsilon == 0:
            continue
        tol = comparison_tolerance(r.num_examples)
        pgds = sorted(
            (parse_attack(a).steps, a) for a in r.attacks if parse_attack(a).kind == "pgd"
        )
        for (few_steps, few), (many_steps, many) in zip(pgds, pgds[1:]):
            if many_steps == few_steps:
                continue
            compared += 1
            if r.attack_accuracy[many] > r.attack_accuracy[few] + tol:
                violations.append(
                    f"epsilon {r.epsilon:g}: {many} accuracy {_pct(r.attack_accuracy[many])} > "
                    f"{few} accuracy {_pct(r.attack_accuracy[few])} (tolerance {_pct(tol)})"
                )
    if not compared:
        return SanityCheck(
            "more_pgd_steps_not_weaker",
            SKIPPED,
            "needs two PGD attacks with different steps at an epsilon > 0",
        )
    return _check(
        "more_pgd_steps_not_weaker",
        violations,
        "PGD with more steps is never weaker than with fewer",
    )


def _check_fgsm(sweep):
    violations, compared = [], 0
    for r in sweep.results:
        if r.epsilon == 0 or "fgsm" not in r.attacks:
            continue
        tol = comparison_tolerance(r.num_examples)
        for name in r.attacks:
            spec = parse_attack(name)
            if spec.kind == "fgsm" or spec.loss != "ce" or spec.targeted:
                continue
            compared += 1
            if r.attack_accuracy[name] > r.attack_accuracy["fgsm"] + tol:
                violations.append(
                    f"epsilon {r.epsilon:g}: {name} accuracy {_pct(r.attack_accuracy[name])} > "
                    f"FGSM accuracy {_pct(r.attack_accuracy['fgsm'])} (tolerance {_pct(tol)})"
                )
    if not compared:
        return SanityCheck(
            "iterative_not_weaker_than_fgsm",
            SKIPPED,
            "needs FGSM and an iterative cross-entropy attack at an epsilon > 0",
        )
    return _check(
        "iterative_not_weaker_than_fgsm",
        violations,
        "iterative cross-entropy attacks are never weaker than FGSM",
    )


def _check_epsilon_zero(sweep):
    zero = [r for r in sweep.results if r.epsilon == 0]
    if not zero:
        return SanityCheck(
            "epsilon_zero_equals_clean", SKIPPED, "no result at epsilon 0 (use epsilon_sweep)"
        )
    violations = []
    for r in zero:
        differ = int(np.sum(r.robust_correct != r.clean_correct))
        if differ:
            violations.append(
                f"at epsilon 0 robust accuracy is {_pct(r.robust_accuracy)} but clean accuracy "
                f"is {_pct(r.clean_accuracy)} ({differ} examples differ): the model is "
                "stochastic or not in inference mode"
            )
    return _check(
        "epsilon_zero_equals_clean",
        violations,
        f"robust accuracy at epsilon 0 = clean accuracy ({_pct(zero[0].clean_accuracy)})",
    )


def _check_monotone(sweep):
    results = sweep.results
    if len(results) < 2:
        return SanityCheck("non_increasing_in_epsilon", SKIPPED, "needs at least two epsilons")
    violations = []
    for low, high in zip(results, results[1:]):
        tol = comparison_tolerance(min(low.num_examples, high.num_examples))
        if high.robust_accuracy > low.robust_accuracy + tol:
            violations.append(
                f"robust accuracy rises from {_pct(low.robust_accuracy)} at epsilon "
                f"{low.epsilon:g} to {_pct(high.robust_accuracy)} at epsilon {high.epsilon:g} "
                f"(tolerance {_pct(tol)})"
            )
    return _check(
        "non_increasing_in_epsilon",
        violations,
        "robust accuracy does not rise with epsilon ("
        + ", ".join(f"{r.epsilon:g}: {_pct(r.robust_accuracy)}" for r in results)
        + ")",
    )


def _check_large_epsilon(sweep):
    checked, violations = [], []
    for r in sweep.results:
        threshold = large_epsilon(r.norm, r.image_shape, r.clip_min, r.clip_max)
        if r.epsilon < threshold * (1 - 1e-9):
            continue
        checked.append(r)
        if r.robust_accuracy > NEAR_ZERO_ACCURACY:
            violations.append(
                f"robust accuracy at epsilon {r.epsilon:g} is {_pct(r.robust_accuracy)} > "
                f"{_pct(NEAR_ZERO_ACCURACY)}: the attacks cannot even exploit a perturbation "
                "that can erase the image, a sign of gradient masking"
            )
    if not checked:
        return SanityCheck(
            "near_zero_at_large_epsilon",
            SKIPPED,
            "no result at a large epsilon (0.5 for L-inf on [0, 1] images; use "
            "epsilon_sweep with include_sanity_epsilons=True)",
        )
    return _check(
        "near_zero_at_large_epsilon",
        violations,
        "robust accuracy <= "
        + _pct(NEAR_ZERO_ACCURACY)
        + " at large epsilon ("
        + ", ".join(f"{r.epsilon:g}: {_pct(r.robust_accuracy)}" for r in checked)
        + ")",
    )


def sanity_checks(results, *, raise_on_failure=False):
    """Runs the gradient-masking sanity checks (see the module docstring).

    Each failure is logged as an error. Checks that need results the
    evaluation did not produce (e.g. epsilon 0 or a large epsilon for a
    single evaluation) are `"skipped"`.

    Args:
        results: A `RobustnessResult`, a `SweepResult` or a list of
            `RobustnessResult` on the same examples.
        raise_on_failure: Raise `SanityCheckError` if any check fails.

    Returns:
        A list of `SanityCheck`.

    Raises:
        SanityCheckError: If a check fails and `raise_on_failure`.
    """
    sweep = _as_sweep(results)
    checks = [
        _check_suite(sweep),
        _check_epsilon_zero(sweep),
        _check_monotone(sweep),
        _check_pgd_steps(sweep),
        _check_fgsm(sweep),
        _check_large_epsilon(sweep),
    ]
    failures = [c for c in checks if c.failed]
    for c in failures:
        _log.error("SANITY CHECK FAILED: %s: %s", c.name, c.message)
    if failures and raise_on_failure:
        raise SanityCheckError(
            "Robustness evaluation failed its sanity checks; do not trust its numbers:\n"
            + "\n".join(f"  - {c.name}: {c.message}" for c in failures)
        )
    return checks


# --- Reports -----------------------------------------------------------------


def _all_attacks(sweep):
    names = []
    for r in sweep.results:
        names += [a for a in r.attacks if a not in names]
    return names


def format_summary(results, checks=None):
    """Readable console text: headline, per-attack table, sanity checks."""
    sweep = _as_sweep(results)
    headline = sweep.headline
    names = _all_attacks(sweep)
    lines = [
        f"Robustness evaluation ({headline.norm}, {headline.num_examples} examples, "
        f"restarts={headline.restarts})",
        f"  clean accuracy:               {_pct(headline.clean_accuracy)}",
        f"  worst-case robust accuracy:   {_pct(headline.robust_accuracy)} at epsilon "
        f"{headline.epsilon:g} (per example, over {', '.join(headline.attacks)})",
        "",
    ]
    width = max([len(n) for n in names] + [9])
    header = f"  {'epsilon':>8}  {'clean':>8}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines += [header + f"  {'worst case':>10}"]
    for r in sweep.results:
        cells = "  ".join(
            f"{_pct(r.attack_accuracy[n]) if n in r.attack_accuracy else '-':>{width}}"
            for n in names
        )
        lines.append(
            f"  {r.epsilon:>8g}  {_pct(r.clean_accuracy):>8}  {cells}  "
            f"{_pct(r.robust_accuracy):>10}"
        )
    if checks is not None:
        lines += ["", "Sanity checks:"]
        for c in checks:
            mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[c.status]
            lines.append(f"  [{mark}] {c.name}: {c.message}")
        if any(c.failed for c in checks):
            lines += [
                "",
                "!!! SANITY CHECKS FAILED: the robust accuracy above is NOT "
                "trustworthy (possible gradient masking or a broken evaluation).",
            ]
    return "\n".join(lines)


def _markdown(sweep, checks, metadata):
    headline = sweep.headline
    names = _all_attacks(sweep)
    lines = ["# Robustness evaluation", ""]
    if metadata:
        lines += [f"- {k}: `{v}`" for k, v in metadata.items()]
    lines += [
        f"- norm: {headline.norm}; examples: {headline.num_examples}; restarts: "
        f"{headline.restarts}; APGD-T targets: {headline.apgd_targets}; seed: {headline.seed}",
        f"- **worst-case robust accuracy: {_pct(headline.robust_accuracy)} at epsilon "
        f"{headline.epsilon:g}** (clean {_pct(headline.clean_accuracy)}); an example counts as "
        "robust only if it is classified correctly under every attack and restart.",
        "",
        "| epsilon | clean | " + " | ".join(names) + " | worst case |",
        "|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for r in sweep.results:
        cells = " | ".join(
            _pct(r.attack_accuracy[n]) if n in r.attack_accuracy else "-" for n in names
        )
        lines.append(
            f"| {r.epsilon:g} | {_pct(r.clean_accuracy)} | {cells} | "
            f"**{_pct(r.robust_accuracy)}** |"
        )
    lines += ["", "## Sanity checks", "", "| check | status | details |", "|---|---|---|"]
    for c in checks:
        status = "**FAILED**" if c.failed else c.status
        lines.append(f"| {c.name} | {status} | {c.message.replace('|', '/')} |")
    if any(c.failed for c in checks):
        lines += ["", "**Sanity checks failed: the numbers above are not trustworthy.**"]
    return "\n".join(lines) + "\n"


def _plot(sweep, path):
    # A bare Figure renders PNG with the Agg canvas: no pyplot, no global
    # backend switch, no display needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    epsilons = sweep.epsilons
    for name in _all_attacks(sweep):
        points = [
            (r.epsilon, r.attack_accuracy[name]) for r in sweep.results if name in r.attack_accuracy
        ]
        axes.plot(*zip(*points), linestyle="--", marker=".", linewidth=1, label=name)
    axes.plot(
        epsilons,
        sweep.robust_accuracies,
        color="black",
        marker="o",
        linewidth=2,
        label="worst case",
    )
    axes.axhline(sweep.headline.clean_accuracy, color="grey", linestyle=":", label="clean")
    axes.set_xlabel(f"epsilon ({sweep.headline.norm})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"Robust accuracy vs epsilon ({sweep.headline.num_examples} examples)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def write_report(results, output_dir, *, checks=None, metadata=None):
    """Writes `results.json`, `results.md` and `robust_accuracy_vs_epsilon.png`.

    Args:
        results: A `RobustnessResult`, `SweepResult` or list of results.
        output_dir: Directory to write to (created if missing).
        checks: The `sanity_checks` results; computed if None.
        metadata: Optional JSON-serialisable dict (model path, dataset, ...).

    Returns:
        `{"json": path, "markdown": path, "plot": path}`.
    """
    sweep = _as_sweep(results)
    if checks is None:
        checks = sanity_checks(sweep)
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, REPORT_JSON),
        "markdown": os.path.join(output_dir, REPORT_MARKDOWN),
        "plot": os.path.join(output_dir, REPORT_PLOT),
    }
    payload = {
        "metadata": dict(metadata or {}),
        **sweep.to_dict(),
        "sanity_checks": [c.to_dict() for c in checks],
        "sanity_checks_passed": not any(c.failed for c in checks),
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(_markdown(sweep, checks, metadata))
    _plot(sweep, paths["plot"])
    return paths


# --- AutoAttack (keras_adr.autoattack) ---------------------------------------

from keras_adr.autoattack import AutoAttackResult, autoattack  # noqa: E402,F401
