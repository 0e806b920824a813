"""Attack names of the evaluation suite, and the per-example worst case.

Attack names:

- `"fgsm"`: one signed-gradient step of size epsilon (deterministic: one run).
- `"pgd<N>"` (`"pgd20"`, `"pgd100"`): N steps of PGD on the cross-entropy,
  step size `2.5 * epsilon / N` (Madry et al. 2018), each restart from a
  fresh uniform random start.
- `"apgd_ce"`, `"apgd_dlr"`, `"apgd_dlr_t"`, optionally followed by the number
  of steps (`"apgd_ce50"`; default `config.APGD_STEPS`, 100): Auto-PGD on the
  cross-entropy, the DLR loss, or the targeted DLR loss over `apgd_targets`
  target classes (Croce & Hein 2020).

A suite must contain at least one PGD attack and one APGD attack, so that no
report claims robustness from a single-step or a single weak attack.

Pure Python and numpy: `keras_adr.config.EvalConfig` validates its attacks here.
"""

import dataclasses
import re

import numpy as np

from keras_adr import config as config_lib

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
