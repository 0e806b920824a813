"""How a robustness evaluation runs (`EvalConfig`, its defaults), its attack names, the worst case.

Attack names:

- `"fgsm"`: one signed-gradient step of size epsilon (deterministic: one run).
- `"pgd<N>"` (`"pgd20"`, `"pgd100"`): N steps of PGD on the cross-entropy,
  step size `2.5 * epsilon / N` (Madry et al. 2018), each restart from a
  fresh uniform random start.
- `"apgd_ce"`, `"apgd_dlr"`, `"apgd_dlr_t"`, optionally followed by the number
  of steps (`"apgd_ce50"`; default `APGD_STEPS`, 100): Auto-PGD on the
  cross-entropy, the DLR loss, or the targeted DLR loss over `apgd_targets`
  target classes (Croce & Hein 2020).

A suite must contain at least one PGD attack and one APGD attack, so that no
report claims robustness from a single-step or a single weak attack.

No TensorFlow computation: below `keras_adr.evaluation`, which runs the suite.
"""

import dataclasses
import re

import numpy as np

from keras_adr import precision as precision_lib
from keras_adr._checks import check_choice, check_number, plain
from keras_adr.config import NORMS, AttackConfig

# Evaluation defaults: those of EvalConfig (keras_adr.evaluation, adr-evaluate),
# adr-train's final evaluation, `callbacks.RobustAccuracy` and the Fashion-MNIST
# benchmarks. The worst case over PGD-20, APGD-CE and targeted APGD-DLR, each
# on what the earlier ones left standing.
EVAL_ATTACKS = ("pgd20", "apgd_ce", "apgd_dlr_t")
EVAL_RESTARTS = 1
EVAL_BATCH_SIZE = 128
# Steps of an `apgd_*` name without a number (AutoAttack's).
APGD_STEPS = 100
# Target classes of targeted APGD-DLR: 3 for the fast suite (AutoAttack's
# standard version uses 9).
APGD_TARGETS = 3


_ATTACK_RE = re.compile(r"^(?:(fgsm)|pgd(\d+)|(apgd_ce|apgd_dlr_t|apgd_dlr)(\d+)?)$")


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
    steps = int(pgd_steps if pgd_steps is not None else apgd_steps or APGD_STEPS)
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


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a robustness evaluation runs: the threat model, the attack suite and its budget.

    `keras_adr.evaluation.evaluate_robustness` and `epsilon_sweep` take one
    (or build one from these names as keyword arguments); `adr-evaluate`
    builds one from its flags, whose defaults are these.

    Attributes:
        epsilon: Radius of the threat model, >= 0 (0 runs the identity
            attack). In an `epsilon_sweep`, the headline epsilon.
        norm: `"linf"` or `"l2"`.
        attacks: Attack names (see `parse_attack`): at least
            one PGD and one APGD attack, e.g. `("pgd20", "apgd_ce")`. A list
            is stored as a tuple. An `apgd_*` name without steps runs
            `APGD_STEPS` steps.
        restarts: Runs per randomized attack (PGD: fresh random starts; APGD:
            restarts per target class). An example counts as robust only if
            every run of every attack fails.
        num_examples: Evaluate only the first `num_examples` examples; None:
            all of them.
        seed: Integer seed of the random starts, or None for fresh randomness.
        batch_size: Examples per attack call.
        apgd_targets: Target classes of `apgd_dlr_t` (AutoAttack: 9).
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        precision: The Keras dtype policy in which a model given as a path
            computes (`keras_adr.precision.POLICIES`; a SavedModel computes in
            its exported precision, so only float32). A model object is
            evaluated as it is.
        standalone_attacks: False (default): each attack runs only on the
            examples still standing (classified correctly clean and under
            every earlier attack), AutoAttack's rule, and an attack's
            accuracy is the accuracy *after* it, in the order the attacks
            run. True: every attack on every example, each with its own
            accuracy (for comparing attacks). The worst case is the same
            quantity either way.
    """

    epsilon: float = AttackConfig.epsilon
    norm: str = "linf"
    attacks: tuple = EVAL_ATTACKS
    restarts: int = EVAL_RESTARTS
    num_examples: int = None
    seed: int = 0
    batch_size: int = EVAL_BATCH_SIZE
    apgd_targets: int = APGD_TARGETS
    clip_min: float = 0.0
    clip_max: float = 1.0
    precision: str = "float32"
    standalone_attacks: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, plain(getattr(self, field.name)))
        check_number("epsilon", self.epsilon, minimum=0)
        check_choice("norm", self.norm, NORMS)
        parse_suite(self.attacks)
        for name in ("restarts", "batch_size", "apgd_targets"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        if self.num_examples is not None:
            check_number("num_examples", self.num_examples, minimum=1, integer=True)
        if self.seed is not None:
            check_number("seed", self.seed, integer=True)
        check_number("clip_min", self.clip_min)
        check_number("clip_max", self.clip_max)
        if self.clip_min >= self.clip_max:
            raise ValueError(
                f"`clip_min` ({self.clip_min}) must be smaller than `clip_max` ({self.clip_max})."
            )
        check_choice("precision", self.precision, precision_lib.POLICIES)
        if not isinstance(self.standalone_attacks, bool):
            raise ValueError(
                f"`standalone_attacks` must be True or False; got {self.standalone_attacks!r}."
            )
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "attacks", tuple(self.attacks))
        for name in ("restarts", "batch_size", "apgd_targets", "num_examples", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "clip_min", float(self.clip_min))
        object.__setattr__(self, "clip_max", float(self.clip_max))

    def replace(self, **overrides):
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"Unknown EvalConfig field(s) {sorted(unknown)}; valid fields: "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **overrides)

    def get_config(self):
        config = dataclasses.asdict(self)
        config["attacks"] = list(self.attacks)  # JSON has no tuples.
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
