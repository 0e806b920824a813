"""Results of an evaluation: one epsilon, a sweep over epsilons, an AutoAttack run.

Each keeps its per-example outcome (boolean arrays) beside the accuracies;
`to_dict` gives the JSON-serialisable summary written to reports (and, for
`RobustnessResult`, stored by `adr-train`'s run directory).
"""

import dataclasses
import math

import numpy as np

from keras_adr import specs


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
        attack_accuracy: `{attack: accuracy}`. With `standalone_attacks`,
            per attack the fraction of examples it left correctly
            classified after every restart; otherwise (the cascade) the
            accuracy *after* the attack: correct clean and under it and
            every attack before it, in the order run.
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
        standalone_attacks: Whether every attack ran on every example
            (True) or only on the examples still standing (False).
        attacked_examples: `{attack: number of examples it ran on}`.
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
    apgd_targets: int = specs.APGD_TARGETS
    seed: int = None
    standalone_attacks: bool = True
    attacked_examples: dict = None

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
            "standalone_attacks": self.standalone_attacks,
            "attacked_examples": dict(self.attacked_examples or {}),
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


def as_sweep(results):
    """A `SweepResult` from a `RobustnessResult`, a `SweepResult` or a list of results."""
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


def robustbench_eps(epsilon):
    """Epsilon as RobustBench writes it: `"8/255"` for multiples of 1/255, else the decimal.

    A value with at most four decimals (`0.1`, `0.3`, `0.5`) keeps its decimal
    form; others that are k/255 for an integer k are written as a fraction.
    """
    epsilon = float(epsilon)
    if round(epsilon, 4) == epsilon:
        return f"{epsilon:g}"
    k = round(epsilon * 255)
    if math.isclose(epsilon * 255, k, rel_tol=0, abs_tol=1e-6):
        return f"{k}/255"
    return repr(epsilon)


@dataclasses.dataclass
class AutoAttackResult:
    """The outcome of `autoattack`.

    Attributes:
        epsilon: Radius of the threat model.
        norm: `"linf"` or `"l2"`.
        version: `"standard"`, `"rand"` or `"custom"`.
        attacks: The attacks run, in order.
        clean_correct: Boolean `[N]`.
        robust_correct: Boolean `[N]`: correct clean and under every attack.
        broken_by: `[N]` strings: `"clean"` (misclassified clean), the name
            of the first attack that broke the point, or `""` (robust).
        accuracy_after: `{attack: robust accuracy after it}` (cumulative).
        attack_seconds: `{attack: wall-clock seconds}`.
        x_adv: Float `[N, ...]`: the adversarial example of each broken point,
            the clean image of the others.
        checks: AutoAttack's measurements: `zero_gradient_fraction` of the
            first `zero_gradient_examples` points, and `square_after_white_box`
            (points Square broke after the white-box attacks; absent if
            Square did not run after one). `evaluation.sanity_checks(result)`
            turns them into pass / fail checks.
        seed: The seed used.
    """

    epsilon: float
    norm: str
    version: str
    attacks: tuple
    clean_correct: np.ndarray
    robust_correct: np.ndarray
    broken_by: np.ndarray
    accuracy_after: dict
    attack_seconds: dict
    x_adv: np.ndarray
    checks: dict
    seed: int = None

    @property
    def num_examples(self):
        return len(self.clean_correct)

    @property
    def clean_accuracy(self):
        return float(np.mean(self.clean_correct))

    @property
    def robust_accuracy(self):
        return float(np.mean(self.robust_correct))

    def robustbench(self, *, name=None, defense=None, dataset=None):
        """The result in RobustBench's model-card format (accuracies in percent, as strings)."""
        return {
            "name": name,
            "defense": defense,
            "dataset": dataset,
            "clean_acc": f"{100 * self.clean_accuracy:.2f}",
            "autoattack_acc": f"{100 * self.robust_accuracy:.2f}",
            "eps": robustbench_eps(self.epsilon),
            "n_examples": self.num_examples,
            "norm": {"linf": "Linf", "l2": "L2"}[self.norm],
            "threat_model": {"linf": "Linf", "l2": "L2"}[self.norm],
            "version": self.version,
        }

    def to_dict(self):
        """A JSON-serialisable summary, with the per-example outcome (`broken_by`)."""
        return {
            "epsilon": self.epsilon,
            "norm": self.norm,
            "version": self.version,
            "attacks": list(self.attacks),
            "num_examples": self.num_examples,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "accuracy_after": dict(self.accuracy_after),
            "attack_seconds": {k: round(v, 3) for k, v in self.attack_seconds.items()},
            "checks": dict(self.checks),
            "seed": self.seed,
            "broken_by": [str(b) for b in self.broken_by],
        }
