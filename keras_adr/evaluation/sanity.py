"""Gradient-masking sanity checks: signs that an evaluation is too weak to trust.

Checks of the default suite (`sanity_checks` of a `RobustnessResult` or
`SweepResult`), after Athalye et al. 2018 and Carlini et al. 2019:

- `epsilon_zero_equals_clean`: at epsilon 0 the attack pipeline classifies
  every example as the clean pass does (exact, per example).
- `non_increasing_in_epsilon`: robust accuracy does not rise with epsilon.
- `more_pgd_steps_not_weaker`: PGD with more steps is not weaker than PGD with
  fewer, on the raw per-attack accuracies.
- `iterative_not_weaker_than_fgsm`: iterative cross-entropy attacks are not
  weaker than FGSM.

  These two compare standalone accuracies: they are skipped for a cascaded
  evaluation (the default), where an attack's accuracy is the accuracy after
  it and so never above an earlier one's; run with `standalone_attacks=True`
  (`adr-evaluate --standalone_attacks`) to have them.
- `near_zero_at_large_epsilon`: at a large epsilon (0.5 of the pixel range for
  L-inf, which lets the attack turn every image into flat grey) robust
  accuracy is at most 10%.
- `attack_suite`: the worst case covers a PGD and an APGD attack.

AutoAttack's own checks (`sanity_checks` of an `AutoAttackResult`; Croce &
Hein 2020, autoattack/checks.py):

- `no_zero_input_gradients`: the fraction of checked points whose
  cross-entropy input gradient is exactly zero, where no gradient-based
  attack can move. AutoAttack warns at any such point.
- `square_not_stronger_than_white_box`: the fraction of points that the
  black-box Square attack broke after every white-box attack had failed on
  them; AutoAttack warns above 0.2%. Skipped if Square did not run after a
  white-box attack.

The comparisons between two accuracies, and these two fractions, allow
`comparison_tolerance(n)`: half a percentage point, and at least one example.
Random starts differ between runs, so a sound evaluation may lose or gain an
example or two; gradient masking shows as far larger gaps.
"""

import dataclasses
import logging

import numpy as np

from keras_adr import specs
from keras_adr.evaluation import suite
from keras_adr.evaluation.results import AutoAttackResult, as_sweep

# The highest robust accuracy a sound attack may leave at the large epsilon.
NEAR_ZERO_ACCURACY = 0.10
# Slack of the comparisons between two accuracies: see comparison_tolerance.
COMPARISON_TOLERANCE = 0.005

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

_log = logging.getLogger(__name__)


class SanityCheckError(RuntimeError):
    """A gradient-masking sanity check failed: the evaluation is not trustworthy."""


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
        kinds = {specs.parse_attack(a).kind for a in r.attacks}
        if "pgd" not in kinds or "apgd" not in kinds:
            violations.append(
                f"epsilon {r.epsilon:g}: attacks {list(r.attacks)} lack a PGD or an APGD attack"
            )
    return _check(
        "attack_suite", violations, "every worst case covers at least one PGD and one APGD attack"
    )


_NEEDS_STANDALONE = "compares standalone accuracies; the attacks ran as a cascade"


def _check_pgd_steps(sweep):
    if not all(r.standalone_attacks for r in sweep.results):
        return SanityCheck("more_pgd_steps_not_weaker", SKIPPED, _NEEDS_STANDALONE)
    violations, compared = [], 0
    for r in sweep.results:
        if r.epsilon == 0:
            continue
        tol = comparison_tolerance(r.num_examples)
        pgds = sorted(
            (specs.parse_attack(a).steps, a)
            for a in r.attacks
            if specs.parse_attack(a).kind == "pgd"
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
    if not all(r.standalone_attacks for r in sweep.results):
        return SanityCheck("iterative_not_weaker_than_fgsm", SKIPPED, _NEEDS_STANDALONE)
    violations, compared = [], 0
    for r in sweep.results:
        if r.epsilon == 0 or "fgsm" not in r.attacks:
            continue
        tol = comparison_tolerance(r.num_examples)
        for name in r.attacks:
            spec = specs.parse_attack(name)
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
        threshold = suite.large_epsilon(r.norm, r.image_shape, r.clip_min, r.clip_max)
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


def _check_zero_gradients(result):
    fraction = result.checks.get("zero_gradient_fraction")
    if fraction is None:
        return SanityCheck("no_zero_input_gradients", SKIPPED, "no input gradient was checked")
    checked = result.checks.get("zero_gradient_examples") or result.num_examples
    tol = comparison_tolerance(checked)
    message = (
        f"{_pct(fraction)} of {checked} checked points have an exactly zero input gradient "
        f"(tolerance {_pct(tol)})"
    )
    if fraction > tol:
        return SanityCheck(
            "no_zero_input_gradients",
            FAILED,
            message + ": gradient-based attacks cannot move there, a sign of gradient masking",
        )
    return SanityCheck("no_zero_input_gradients", PASSED, message)


def _check_square(result):
    count = result.checks.get("square_after_white_box")
    if count is None:
        return SanityCheck(
            "square_not_stronger_than_white_box",
            SKIPPED,
            "Square did not run after a white-box attack",
        )
    tol = comparison_tolerance(result.num_examples)
    fraction = count / result.num_examples
    message = (
        f"Square broke {count} of {result.num_examples} points ({_pct(fraction)}) that the "
        f"white-box attacks left robust (tolerance {_pct(tol)})"
    )
    if fraction > tol:
        return SanityCheck(
            "square_not_stronger_than_white_box",
            FAILED,
            message + ": a black-box attack succeeding where the gradients fail is a sign of "
            "gradient masking",
        )
    return SanityCheck("square_not_stronger_than_white_box", PASSED, message)


def sanity_checks(results, *, raise_on_failure=False):
    """Runs the gradient-masking sanity checks (see the module docstring).

    Each failure is logged as an error. Checks that need results the
    evaluation did not produce (e.g. epsilon 0 or a large epsilon for a
    single evaluation) are `"skipped"`.

    Args:
        results: A `RobustnessResult`, a `SweepResult` or a list of
            `RobustnessResult` on the same examples (the default suite's
            checks), or an `AutoAttackResult` (AutoAttack's checks).
        raise_on_failure: Raise `SanityCheckError` if any check fails.

    Returns:
        A list of `SanityCheck`.

    Raises:
        SanityCheckError: If a check fails and `raise_on_failure`.
    """
    if isinstance(results, AutoAttackResult):
        checks = [_check_zero_gradients(results), _check_square(results)]
    else:
        sweep = as_sweep(results)
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
