"""Hyperparameters of an ADR run: the attack and the weighted objective.

`ADRConfig` is the single source of truth for every training hyperparameter.
Command line flags build one, `ADRModel` stores it in its Keras config, and
exported models record it in their metadata. `keras_adr.specs.EvalConfig` is
the same for a robustness evaluation (`keras_adr.evaluation`, `adr-evaluate`).
"""

import dataclasses

from keras_adr._checks import check_choice, check_number

NORMS = ("linf", "l2")
ATTACK_LOSSES = ("auto", "ce", "kl")
OBJECTIVES = ("standard", "pgd", "trades")
DISTANCES = ("l1", "l2")
# The bounded-ADR choices (keras_adr.losses computes them). How the latent
# codes enter the compactness terms:
#   "none": raw codes, as in the paper. The different-label pairs of global
#     compactness carry a negative weight on an unbounded distance, so the
#     objective falls without bound as `z` grows.
#   "rms": each code divided by its root mean square (`z / rms(z)`), so every
#     code has RMS 1: distances are bounded (mean L1 <= 2, mean squared <= 4)
#     and invariant to the scale of `z`, which the network can then not
#     exploit.
LATENT_NORMALIZATIONS = ("none", "rms")
# What different-label pairs of global smoothness push apart:
#   "cross_entropy": the paper's `W_ij CE(p_j, q_i)` with `W_ij < 0`, which
#     falls without bound as `q_i` puts vanishing mass on the classes `p_j`
#     predicts.
#   "overlap": `(1/scale - 1) <p_j, q_i>`, a positive weight on the
#     probability overlap in [0, 1]: the same push, bounded below by 0.
SMOOTHNESS_PUSHES = ("cross_entropy", "overlap")
PAIRWISE_SCOPES = ("global", "replica")
# `AttackConfig.unroll`: "auto" (unroll on machines without a GPU), or a bool.
UNROLL_CHOICES = ("auto", True, False)
# AttackConfig fields that change how fast a run computes, not what it
# computes: run directories and benchmark fingerprints leave them out.
SPEED_ONLY_ATTACK_FIELDS = ("unroll",)

# Madry et al. (2018): a PGD attack of `steps` steps uses the step size
# 2.5 * epsilon / steps, so that it can walk across the ball and back.
PGD_STEP_FACTOR = 2.5

# `DivergenceGuard` (and `adr-train --divergence_factor`): a healthy run's
# epoch loss does not triple; the paper's ADR objective, when it runs away,
# passes 3x its minimum magnitude within one epoch (2.32 -> -8.43 in
# benchmarks/results/stability.md, where the model collapsed to chance).
DEFAULT_DIVERGENCE_FACTOR = 3.0

# The ADR terms, in the order they are reported.
ADR_TERMS = (
    "local_compactness",
    "local_smoothness",
    "global_compactness",
    "global_smoothness",
    "conditional_entropy",
    "label_propagation",
)
# The float hyperparameters of `ADRConfig` (one `adr-train` flag each).
FLOAT_FIELDS = (
    ("natural_weight", "adversarial_weight", "trades_beta")
    + ADR_TERMS
    + ("global_compactness_features", "label_scale", "propagation_alpha")
)


def pgd_step_size(epsilon, steps):
    """The PGD step size of Madry et al.: `2.5 * epsilon / steps`."""
    return PGD_STEP_FACTOR * epsilon / steps


@dataclasses.dataclass(frozen=True, repr=False)
class AttackConfig:
    """The threat model used to craft training (and validation) adversaries.

    Attributes:
        norm: `"linf"` or `"l2"`: the ball the perturbation lives in.
        epsilon: Radius of the ball, in pixel units of [0, 1] images.
        step_size: Size of one ascent step; `None` (default) follows
            `pgd_step_size(epsilon, steps)` = `2.5 * epsilon / steps`, also
            after `epsilon` or `steps` change (see `resolved_step_size`).
        steps: Number of ascent steps (1 = FGSM-like). The default, 10 steps
            of 0.025 at epsilon 0.1, is what `adr-train` runs: the frontier
            study's attack, which beat 5 steps on validation.
        random_start: Start from a random point of the ball (PGD). The TRADES
            KL attack always starts at `x + 0.001 * N(0, 1)`.
        loss: `"ce"` (cross-entropy to the label), `"kl"` (the TRADES attack)
            or `"auto"`: `"kl"` for the TRADES objective, `"ce"` otherwise.
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        unroll: Whether the attack's steps are traced one by one instead of
            as a `tf.while_loop` (`keras_adr.attacks.pgd(unroll=...)`): the
            same attack, in a graph that grows with `steps`. `"auto"`
            (default): unrolled on machines without a GPU, where TensorFlow's
            oneDNN rewrite sometimes left the loop's max-pool gradients on a
            slow kernel for a whole run (see
            `keras_adr.training.unrolls_training_attack`); `True` or `False`
            on every machine. It changes only the speed, so run directories
            and benchmark fingerprints ignore it (`result_config`).
    """

    norm: str = "linf"
    epsilon: float = 0.1
    step_size: float = None
    steps: int = 10
    random_start: bool = True
    loss: str = "auto"
    clip_min: float = 0.0
    clip_max: float = 1.0
    unroll: object = "auto"

    def __post_init__(self):
        # `1 in UNROLL_CHOICES` holds (1 == True): only a bool or "auto".
        if not (isinstance(self.unroll, bool) or self.unroll == "auto"):
            raise ValueError(f"`unroll` must be 'auto', True or False; got {self.unroll!r}.")
        check_choice("norm", self.norm, NORMS)
        check_choice("loss", self.loss, ATTACK_LOSSES)
        check_number("epsilon", self.epsilon, exclusive_minimum=0)
        if self.step_size is not None:
            check_number("step_size", self.step_size, exclusive_minimum=0)
        check_number("steps", self.steps, minimum=1, integer=True)
        check_number("clip_min", self.clip_min)
        check_number("clip_max", self.clip_max)
        if not isinstance(self.random_start, bool):
            raise ValueError(f"`random_start` must be a bool; got {self.random_start!r}.")
        if self.clip_min >= self.clip_max:
            raise ValueError(
                f"`clip_min` ({self.clip_min}) must be smaller than `clip_max` ({self.clip_max})."
            )
        object.__setattr__(self, "steps", int(self.steps))

    def __repr__(self):
        fields = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            text = repr(value)
            if field.name == "step_size" and value is None:
                # Show the step a run takes, not only the rule's marker.
                text = f"None (2.5 * epsilon / steps = {self.resolved_step_size:g})"
            fields.append(f"{field.name}={text}")
        return f"AttackConfig({', '.join(fields)})"

    @property
    def resolved_step_size(self):
        """The step size actually used: `step_size`, or the PGD rule if None."""
        if self.step_size is not None:
            return self.step_size
        return pgd_step_size(self.epsilon, self.steps)

    def resolved_loss(self, objective):
        """The attack loss actually used with `objective`."""
        if self.loss != "auto":
            return self.loss
        return "kl" if objective == "trades" else "ce"

    def get_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class ADRConfig:
    """Every hyperparameter of ADR training.

    The total loss is the base objective plus the weighted ADR terms:

    * `objective="standard"`: `CE(x)`; no adversary (ADR weights must be 0).
    * `objective="pgd"`: `natural_weight * CE(x) + adversarial_weight * CE(x_adv)`.
    * `objective="trades"`: `CE(x) + trades_beta * KL(p(x) || p(x_adv))`.

    plus `sum_t weight_t * term_t` over the ADR terms of `ADR_TERMS`. With all
    ADR weights at 0 this is plain PGD-AT or TRADES.

    Attributes:
        objective: `"standard"`, `"pgd"` or `"trades"`.
        attack: The `AttackConfig` (a dict is converted).
        natural_weight: Weight of the clean cross-entropy (PGD objective).
        adversarial_weight: Weight of the adversarial cross-entropy (PGD).
        trades_beta: Weight of the TRADES KL term.
        local_compactness: Weight of the local compactness term.
        local_smoothness: Weight of the local smoothness term.
        global_compactness: Weight of the label-weighted pairwise compactness.
        global_compactness_features: Share in (0, 1] of the latent features
            that global compactness compares in a step: 1 (default) compares
            all, the paper's term; below 1, a uniform random subset drawn
            afresh each step (the same on every replica), an unbiased
            estimate of the term at about that share of its cost (its sorts
            and searches dominate an ADR step's overhead on CPUs).
        global_smoothness: Weight of the label-weighted pairwise smoothness.
        conditional_entropy: Weight of the adversarial prediction entropy.
        label_propagation: Weight of the label-propagation term.
        label_scale: Pair weight scale in (0, 1): pairs of different labels
            get the weight `1 - 1 / label_scale` (slightly negative).
        compactness_distance: `"l1"` or `"l2"` for local compactness.
        latent_normalization: `"rms"` (default): the compactness terms compare
            codes divided by their root mean square, which bounds them and
            makes them blind to the scale of `z`; `"none"`: raw codes, the
            paper's (unbounded below with `label_scale < 1`).
        smoothness_push: What different-label pairs of global smoothness
            minimise: `"overlap"` (default), `(1/label_scale - 1)` times the
            probability overlap, bounded below by 0; `"cross_entropy"`, the
            paper's negative-weight cross-entropy (unbounded below).
        propagation_alpha: Label-propagation alpha in (0, 1).
        propagation_neighbors: k of the k-nearest-neighbour graph.
        pairwise_scope: Under a distribution strategy, `"global"` computes the
            pairwise terms over the whole global batch (exactly equal to one
            device); `"replica"` only within each replica's batch (cheaper).
    """

    objective: str = "pgd"
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    natural_weight: float = 1.0
    adversarial_weight: float = 1.0
    trades_beta: float = 6.0
    local_compactness: float = 1.0
    local_smoothness: float = 1.0
    global_compactness: float = 1.0
    global_compactness_features: float = 1.0
    global_smoothness: float = 1.0
    conditional_entropy: float = 1.0
    label_propagation: float = 0.0
    label_scale: float = 0.99
    compactness_distance: str = "l1"
    latent_normalization: str = "rms"
    smoothness_push: str = "overlap"
    propagation_alpha: float = 0.99
    propagation_neighbors: int = 10
    pairwise_scope: str = "global"

    def __post_init__(self):
        if isinstance(self.attack, dict):
            object.__setattr__(self, "attack", AttackConfig(**self.attack))
        if not isinstance(self.attack, AttackConfig):
            raise ValueError(f"`attack` must be an AttackConfig or a dict; got {self.attack!r}.")
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("compactness_distance", self.compactness_distance, DISTANCES)
        check_choice("latent_normalization", self.latent_normalization, LATENT_NORMALIZATIONS)
        check_choice("smoothness_push", self.smoothness_push, SMOOTHNESS_PUSHES)
        check_choice("pairwise_scope", self.pairwise_scope, PAIRWISE_SCOPES)
        for name in ("natural_weight", "adversarial_weight", "trades_beta") + ADR_TERMS:
            check_number(name, getattr(self, name), minimum=0)
        check_number("label_scale", self.label_scale, exclusive_minimum=0, exclusive_maximum=1)
        check_number(
            "global_compactness_features",
            self.global_compactness_features,
            exclusive_minimum=0,
            maximum=1,
        )
        check_number(
            "propagation_alpha", self.propagation_alpha, exclusive_minimum=0, exclusive_maximum=1
        )
        check_number("propagation_neighbors", self.propagation_neighbors, minimum=1, integer=True)
        object.__setattr__(self, "propagation_neighbors", int(self.propagation_neighbors))
        if self.objective == "standard" and self.enabled_terms:
            raise ValueError(
                "objective='standard' trains without adversarial examples, so the ADR "
                f"terms {list(self.enabled_terms)} cannot be computed: set their weights "
                "to 0 or use objective='pgd' or 'trades'."
            )

    @property
    def enabled_terms(self):
        """Names of the ADR terms with a non-zero weight."""
        return tuple(name for name in ADR_TERMS if getattr(self, name) > 0)

    @property
    def samples_features(self):
        """Whether global compactness draws random latent features each step (needs a seed)."""
        return self.global_compactness > 0 and self.global_compactness_features < 1

    @property
    def uses_adversary(self):
        return self.objective != "standard"

    @property
    def attack_loss(self):
        return self.attack.resolved_loss(self.objective)

    def result_config(self):
        """`get_config()` without the fields that change only the speed (`attack.unroll`).

        What run directories compare and benchmarks fingerprint: a run
        resumed with another `unroll` computes the same thing.
        """
        return without_speed_fields(self.get_config())

    def replace(self, **overrides):
        """A copy with some fields changed; `attack_*` keys change the attack."""
        attack_overrides = {
            key[len("attack_") :]: overrides.pop(key)
            for key in list(overrides)
            if key.startswith("attack_")
        }
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"Unknown ADRConfig field(s) {sorted(unknown)}; valid fields: "
                f"{[f.name for f in dataclasses.fields(self)]} (attack fields as 'attack_<name>')."
            )
        unknown_attack = set(attack_overrides) - {f.name for f in dataclasses.fields(AttackConfig)}
        if unknown_attack:
            raise ValueError(
                f"Unknown AttackConfig field(s) {sorted('attack_' + k for k in unknown_attack)}; "
                f"valid: {['attack_' + f.name for f in dataclasses.fields(AttackConfig)]}."
            )
        attack = overrides.pop("attack", self.attack)
        if isinstance(attack, dict):
            attack = AttackConfig(**attack)
        if attack_overrides:
            attack = dataclasses.replace(attack, **attack_overrides)
        return dataclasses.replace(self, attack=attack, **overrides)

    def get_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def without_speed_fields(config):
    """An `ADRConfig.get_config()` dict (also a stored one) without `SPEED_ONLY_ATTACK_FIELDS`."""
    config = dict(config)
    if isinstance(config.get("attack"), dict):
        config["attack"] = {
            k: v for k, v in config["attack"].items() if k not in SPEED_ONLY_ATTACK_FIELDS
        }
    return config
