"""The robustness benchmark's presets and rows, and the fingerprint of a row.

A preset (`PRESETS`) is everything that is the same for every row of a
benchmark; `rows_of` lists its rows (`Row`: a defense, ADR overrides, a seed
and a training precision). `fingerprint` hashes what determines a row's
result: a finished row file counts as done only while its fingerprint is
today's, so names and fingerprints of existing rows must not change.
"""

import dataclasses
import hashlib
import json

from keras_adr import specs
from keras_adr.recipe import RECIPE

DEFENSES = ("standard", "pgd_at", "trades", "adr_pgd", "adr_trades")
HEADLINE = ("pgd_at", "adr_pgd")
ABLATED_TERMS = (
    "local_compactness",
    "local_smoothness",
    "global_compactness",
    "global_smoothness",
    "conditional_entropy",
)
LABEL_PROPAGATION_WEIGHTS = (0.5, 1.0)
# The training precision of every row before rows had one: rows in it keep
# their names and fingerprints. Every model is evaluated in it too, whatever
# it was trained in (what adr-evaluate does by default).
BASE_PRECISION = "float32"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that is the same for every row of a benchmark."""

    description: str
    dataset: str
    model: str
    epsilon: float
    attack_steps: int
    step_size: float
    epochs: int
    train_examples: int  # None = the whole training split
    validation_examples: int
    batch_size: int
    optimizer: str
    learning_rate: float
    lr_decay_fractions: tuple
    weight_decay: float
    test_examples: int  # None = the whole test split
    eval_attacks: tuple
    restarts: int
    apgd_targets: int
    eval_seed: int = 0
    seeds: tuple = (0, 1, 2)
    budget: str = ""
    # Rows: the seed-0 defenses, and whether the ablation rows run.
    defenses: tuple = DEFENSES
    ablation: bool = True
    # Evaluate the models benchmarks/stability.py trained with the same recipe.
    reuse_stability: bool = False
    # Keras dtype policies of training (`keras_adr.precision.POLICIES`); every
    # row runs once in each, the first is the reference of the comparison.
    precisions: tuple = (BASE_PRECISION,)
    # Variants of adr_pgd, each run at every seed next to it and compared with
    # it: `((suffix, label, ((ADRConfig field, value), ...)), ...)`.
    variants: tuple = ()
    # Points of a frontier (`Point`s): the preset's rows instead of `defenses`.
    points: tuple = ()
    # Points run again at `seeds[1:]` (names of `points`), chosen on validation.
    seeded_points: tuple = ()
    # Every attack on every test image (True), or each attack only on the
    # images all earlier ones left correct (False, the library's default;
    # the same worst case, less work).
    standalone_attacks: bool = False
    # Epsilon of the validation attack that selects the checkpoint (None:
    # the training attack's). A frontier selects every row at the test epsilon.
    validation_epsilon: float = None


@dataclasses.dataclass(frozen=True)
class Point:
    """A point of a frontier: a defense with its overrides (and EMA of the weights)."""

    name: str
    defense: str
    label: str
    overrides: tuple = ()  # ((ADRConfig field, value), ...)
    ema_momentum: float = 0.0
    # "main": a point of its family's curve; DEFAULT_GROUP: adr-train's default
    # recipe, compared with the frontier's choices on validation, on no curve.
    group: str = "main"


# The group of a frontier's point for adr-train's default recipe.
DEFAULT_GROUP = "default"

# Fields that choose rows or where a model comes from, not what a row computes
# (a row's precision is in the row).
_NOT_FINGERPRINTED = (
    "description",
    "budget",
    "seeds",
    "defenses",
    "ablation",
    "reuse_stability",
    "precisions",
    "variants",
    "points",
    "seeded_points",
)
# ADRConfig fields added after rows were committed, with the value every
# earlier row had: left out of the fingerprint at that value, so finished
# rows stay done.
_LATER_CONFIG_FIELDS = {"global_compactness_features": 1.0}
# The same for preset fields: every earlier row attacked every image with
# every attack, and validated with the training attack.
_LATER_PRESET_FIELDS = {"standalone_attacks": True, "validation_epsilon": None}


# What adr-train trained with before the frontier study (PGD-5 of step 0.05,
# every bounded ADR weight at 1): the studies run on it pin it, so that their
# rows keep their meaning and fingerprints when the library's defaults move.
PGD5_RECIPE = dataclasses.replace(RECIPE, attack_steps=5)
UNIT_ADR_WEIGHTS = {term: 1.0 for term in ABLATED_TERMS}
_BOUNDED_ADR = ("adr_pgd", "adr_trades")


def pinned_config(defense, **overrides):
    """`keras_adr.presets.get(defense, **overrides)`, bounded ADR at the studies' unit weights."""
    from keras_adr import presets

    pinned = UNIT_ADR_WEIGHTS if defense in _BOUNDED_ADR else {}
    return presets.get(defense, **{**pinned, **overrides})


def _recipe_fields(recipe=PGD5_RECIPE):
    """The `Preset` fields that a `keras_adr.recipe.Recipe` sets."""
    return dict(
        dataset=recipe.dataset,
        model=recipe.model,
        epsilon=recipe.epsilon,
        attack_steps=recipe.attack_steps,
        step_size=recipe.attack_step_size,
        epochs=recipe.epochs,
        validation_examples=recipe.validation_examples,
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer,
        learning_rate=recipe.learning_rate,
        lr_decay_fractions=recipe.lr_decay_fractions,
        weight_decay=recipe.weight_decay,
    )


PRESETS = {
    # The issue-9 benchmark: a real training budget. 10 epochs of the whole
    # training split minus 2,000 validation images (4,540 steps), the training
    # recipe of benchmarks/stability.py, all 10,000 test images. On the
    # 2-core machines here one row takes about 50 min of training (one thread
    # per process, two processes) and 30 min of evaluation.
    "fmnist": Preset(
        description="Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), "
        "Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 10 epochs on "
        "58,000 training images",
        **_recipe_fields(),
        train_examples=None,
        test_examples=None,
        eval_attacks=specs.EVAL_ATTACKS,
        restarts=1,
        apgd_targets=3,
        budget="9 rows x (about 50 min training + 30 min evaluation) of one core here",
        defenses=("pgd_at", "adr_pgd", "trades", "adr_trades", "adr_pgd_paper"),
        ablation=False,
        reuse_stability=True,
        standalone_attacks=True,
    ),
    # Sized by measurement on a 2-core AMD EPYC (AVX-512) machine shared with
    # other jobs: the 16 rows took 17.4 minutes there (1,712 CPU-seconds; see
    # benchmarks/README.md), so that a 2-core machine 4-5x slower (an older
    # AVX2-only one) still finishes within 100 minutes.
    "cpu": Preset(
        description="Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), "
        "Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 1 epoch on a "
        "training subset",
        **{**_recipe_fields(), "epochs": 1, "validation_examples": 500},
        train_examples=15_500,
        test_examples=256,
        eval_attacks=("pgd20", "pgd100", "apgd_ce", "apgd_dlr_t"),
        restarts=2,
        apgd_targets=3,
        standalone_attacks=True,
        budget="all 16 rows <= 100 min on a 2-core CPU machine 4-5x slower than the "
        "reference one (17.4 min on the reference machine)",
    ),
    # MNIST as in Madry et al. / TRADES / ADR: epsilon 0.3, 40-step PGD of
    # step 0.01, SGD momentum 0.9 lr 0.01, 100 epochs (decay at 55/75/90 as
    # TRADES' MNIST schedule), AutoAttack-strength evaluation on the whole
    # test set. For one GPU.
    "paper_mnist": Preset(
        description="MNIST, small CNN, L-inf epsilon 0.3, PGD-40 training (step 0.01), SGD "
        "momentum 0.9 lr 0.01 with x0.1 decay at 55%/75%/90%, batch 128, 100 epochs",
        dataset="mnist",
        model="small_cnn",
        epsilon=0.3,
        attack_steps=40,
        step_size=0.01,
        epochs=100,
        train_examples=None,
        validation_examples=1000,
        batch_size=128,
        optimizer="sgd",
        learning_rate=0.01,
        lr_decay_fractions=(0.55, 0.75, 0.9),
        weight_decay=0.0,
        test_examples=None,
        eval_attacks=("pgd20", "pgd100", "apgd_ce", "apgd_dlr_t"),
        restarts=5,
        apgd_targets=9,
        budget="GPU: roughly 16 rows x 100 epochs of PGD-40 training",
    ),
    # CIFAR-10, PreAct ResNet-18: epsilon 8/255, 10-step PGD of step 2/255,
    # SGD momentum 0.9 lr 0.1, weight decay 5e-4, 100 epochs with decay at
    # 75/90 (TRADES' schedule), crop + flip augmentation. For one GPU.
    "paper_cifar10": Preset(
        description="CIFAR-10, PreAct ResNet-18, L-inf epsilon 8/255, PGD-10 training (step "
        "2/255), SGD momentum 0.9 lr 0.1 with x0.1 decay at 75%/90%, weight decay "
        "5e-4, batch 128, 100 epochs",
        dataset="cifar10",
        model="resnet18",
        epsilon=8 / 255,
        attack_steps=10,
        step_size=2 / 255,
        epochs=100,
        train_examples=None,
        validation_examples=1000,
        batch_size=128,
        optimizer="sgd",
        learning_rate=0.1,
        lr_decay_fractions=(0.75, 0.9),
        weight_decay=5e-4,
        test_examples=None,
        eval_attacks=("pgd20", "pgd100", "apgd_ce", "apgd_dlr_t"),
        restarts=5,
        apgd_targets=9,
        budget="GPU: roughly 16 rows x 100 epochs of PGD-10 ResNet-18 training",
    ),
}
# Issue 14: does training in bfloat16 cost robustness? The fmnist recipe for
# 1 epoch (454 steps), each model trained in float32 and in mixed bfloat16
# and evaluated in float32 on 2,000 test images. Estimated from the fmnist
# rows: per row about 5 min of training and 10 min of evaluation on one core,
# so about an hour with two single-thread processes.
PRESETS["precision"] = dataclasses.replace(
    PRESETS["fmnist"],
    description="Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), "
    "Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 1 epoch on 58,000 "
    "training images, in float32 and in mixed bfloat16",
    epochs=1,
    test_examples=2000,
    budget="8 rows x (about 5 min training + 10 min evaluation) of one core here",
    defenses=HEADLINE,
    seeds=(0, 1),
    reuse_stability=False,
    precisions=(BASE_PRECISION, "mixed_bfloat16"),
)
# Issue 14: global compactness is the whole overhead of adr_pgd over pgd_at in
# bfloat16 (docs/mixed-precision.md). Does computing it on a random
# quarter of the latent features each step (about a quarter of its cost)
# cost robustness? The precision preset's recipe in mixed bfloat16 (its
# pgd_at and adr_pgd rows of seeds 0 and 1 have the same fingerprints, so
# their row files count here too), four seeds.
PRESETS["compactness_sampling"] = dataclasses.replace(
    PRESETS["precision"],
    description="Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), "
    "Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 1 epoch on 58,000 "
    "training images, in mixed bfloat16; adr_pgd with global compactness on all latent "
    "features and on a random quarter of them per step",
    budget="12 rows x (about 2 min training + 5 min evaluation) of one core here",
    seeds=(0, 1, 2, 3),
    precisions=("mixed_bfloat16",),
    variants=(
        (
            "gc_quarter",
            "global compactness on 25% of features",
            (("global_compactness_features", 0.25),),
        ),
    ),
)
# The same question at the fmnist budget (10 epochs, all 10,000 test images),
# seeds 0, 1 and 2: does the sampled term still cost nothing when training goes on?
PRESETS["compactness_sampling_fmnist"] = dataclasses.replace(
    PRESETS["fmnist"],
    description=PRESETS["fmnist"].description
    + ", in mixed bfloat16; adr_pgd with global compactness on all latent features and on "
    "a random quarter of them per step",
    budget="6 rows x (about 12 min training + 25 min evaluation) of one core here",
    defenses=("adr_pgd",),
    seeds=(0, 1, 2),
    reuse_stability=False,
    precisions=("mixed_bfloat16",),
    variants=PRESETS["compactness_sampling"].variants,
)

# Does ADR move the robustness-accuracy frontier? The fmnist recipe with a
# 10-step training attack of step 2.5 * eps / 10 for every family, in mixed
# bfloat16 (no robustness cost: the precision studies), each row's
# checkpoint chosen on validation by PGD at the test epsilon. Each family is
# a curve: PGD-AT over the training epsilon, TRADES over beta, bounded ADR
# over a scale lambda of every ADR weight; EMA of the weights on and off.
_FRONTIER_RECIPE = dataclasses.replace(PGD5_RECIPE, attack_steps=10)


def _point(name, defense, label, overrides, ema=0.0):
    """A frontier `Point`; with `ema`, its name and label say so."""
    return Point(
        name + ("_ema" if ema else ""), defense, label + (", EMA" if ema else ""), overrides, ema
    )


def _pgd_at_point(epsilon, ema=0.0):
    step = dataclasses.replace(_FRONTIER_RECIPE, epsilon=epsilon).attack_step_size
    return _point(
        f"pgd_at_eps{epsilon:g}".replace(".", "p"),
        "pgd_at",
        f"PGD-AT, training eps {epsilon:g}",
        (("attack_epsilon", epsilon), ("attack_step_size", step)),
        ema,
    )


def _trades_point(beta):
    return _point(
        f"trades_beta{beta:g}".replace(".", "p"),
        "trades",
        f"TRADES, beta {beta:g}",
        (("trades_beta", float(beta)),),
    )


def _adr_point(scale, ema=0.0):
    # ABLATED_TERMS: the ADR weights that are 1 in adr_pgd (label propagation is 0).
    return _point(
        f"adr_pgd_x{scale:g}".replace(".", "p"),
        "adr_pgd",
        f"ADR-PGD, ADR weights x{scale:g}",
        tuple((t, float(scale)) for t in ABLATED_TERMS),
        ema,
    )


# adr-train's default recipe when the frontier started (ADR weights x1, the
# PGD-5 training attack, no EMA), trained and selected like the points: the
# reference that the frontier's choices must beat on validation to become
# the defaults (benchmarks/frontier_defaults.py).
_DEFAULT_POINT = Point(
    "adr_pgd_x1_pgd5",
    "adr_pgd",
    f"ADR-PGD, ADR weights x1, PGD-{PGD5_RECIPE.attack_steps} training (adr-train's default)",
    (
        ("attack_steps", PGD5_RECIPE.attack_steps),
        ("attack_step_size", PGD5_RECIPE.attack_step_size),
    ),
    group=DEFAULT_GROUP,
)
# EMA momentum of the frontier's EMA points (about 2 epochs of 454 steps).
FRONTIER_EMA_MOMENTUM = 0.999
# In the order they run: the two headline points first, then what brackets them.
FRONTIER_POINTS = (
    _adr_point(1),
    _pgd_at_point(0.10),
    _trades_point(6),
    _pgd_at_point(0.12),
    _adr_point(0.5),
    _pgd_at_point(0.14),
    _trades_point(3),
    _trades_point(1),
    _adr_point(2),
    _adr_point(0.25),
    # Validation robust accuracy rose with the scale up to x2, the grid's edge
    # (76.15, 76.45, 76.75, 77.35% at x0.25-x2): one more scale past it.
    _adr_point(4),
    # ADR x2's test clean accuracy (85.38%) fell below eps 0.14's (85.45%): a
    # PGD-AT point with less clean accuracy, so that the curve brackets it.
    _pgd_at_point(0.16),
    _adr_point(1, FRONTIER_EMA_MOMENTUM),
    # The PGD-AT point nearest ADR x1 in validation clean accuracy (86.7% against
    # 86.9%; eps 0.1: 87.35%), once the seed-0 points had run.
    _pgd_at_point(0.12, FRONTIER_EMA_MOMENTUM),
    _DEFAULT_POINT,
    # Seed rule: every seed's PGD-AT curve must bracket that seed's ADR x2 test
    # clean accuracy. At seed 1 ADR x2 (84.48%) fell below eps 0.14 and 0.16
    # (85.19, 85.39%); at seed 0 clean accuracy fell about 0.4 points per 0.02
    # of eps, so 0.18 would land near 84.4 +- the seed noise and 0.2 below it.
    # It did not: at seeds 1 and 2, eps 0.2 gained clean accuracy and lost
    # robustness (docs/benchmarks.md), so those seeds stay unbracketed.
    _pgd_at_point(0.2),
)
PRESETS["frontier"] = dataclasses.replace(
    PRESETS["fmnist"],
    description="Fashion-MNIST, small CNN, L-inf epsilon 0.1 (test), PGD-10 training (step "
    "2.5 eps / 10), Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 10 epochs "
    "on 58,000 training images, in mixed bfloat16; checkpoints chosen on 2,000 validation "
    "images by PGD-10 at eps 0.1; PGD-AT over the training eps, TRADES over beta, ADR-PGD "
    "over a scale of its weights, EMA of the weights on and off",
    **_recipe_fields(_FRONTIER_RECIPE),
    budget="16 points + 10 seed rows, each about 1 core-hour of training and 30 min of "
    "evaluation here",
    defenses=(),
    seeds=(0, 1, 2),
    reuse_stability=False,
    standalone_attacks=False,
    validation_epsilon=0.1,
    precisions=("mixed_bfloat16",),
    points=FRONTIER_POINTS,
    # Chosen on validation at seed 0: ADR x2 (77.35% robust; x4 ties it with
    # less clean accuracy, 85.3% against 86.4%) and the PGD-AT points around
    # its validation clean accuracy (eps 0.14: 86.0%, eps 0.12: 86.7%).
    # PGD-AT is the best family on validation there. Eps 0.16 too: at seed 0
    # ADR x2's test clean accuracy fell below eps 0.14's, and the curve of
    # every seed must reach it; eps 0.2 for the same reason at seed 1.
    seeded_points=(
        "adr_pgd_x2",
        "pgd_at_eps0p14",
        "pgd_at_eps0p12",
        "pgd_at_eps0p16",
        "pgd_at_eps0p2",
    ),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One trained model: a defense, its ADR overrides, a seed and a training precision."""

    name: str
    group: str  # "main", "seeds" or "ablation"
    defense: str
    seed: int = 0
    overrides: tuple = ()  # ((ADRConfig field, value), ...)
    label: str = ""
    precision: str = BASE_PRECISION  # Keras dtype policy of training
    ema_momentum: float = 0.0  # of the weights (0 = none)


def tagged(name, precision, preset):
    """`name` of a row (or a defense) trained in `precision`, in `preset`.

    Presets of float32 only keep the names of before the precision axis.
    """
    return name if preset.precisions == (BASE_PRECISION,) else f"{name}_{precision}"


def precision_of(result):
    """The training precision of a finished row's result."""
    # Row files from before the precision axis trained in float32 and say nothing.
    return result.get("precision", BASE_PRECISION)


def rows_of(preset):
    """The rows of a preset, headline rows first (so a cut-short run has them).

    With several precisions, every row once per precision, next to each other
    (so a cut-short run has complete pairs).
    """
    rows = _base_rows(preset)
    if preset.precisions == (BASE_PRECISION,):
        return rows
    return [
        dataclasses.replace(
            row, name=tagged(row.name, p, preset), label=f"{row.label}, {p}", precision=p
        )
        for row in rows
        for p in preset.precisions
    ]


def _base_rows(preset):
    """The rows of a preset, each in the base precision, named as before precisions."""
    first, *others = preset.seeds
    if preset.points:
        return point_rows(preset)
    rows = [Row(d, "main", d, first, label=d) for d in preset.defenses]
    rows += [
        Row(f"{d}_seed{s}", "seeds", d, s, label=f"{d} (seed {s})")
        for d in HEADLINE
        if d in preset.defenses
        for s in others
    ]
    if not preset.ablation:
        return rows + variant_rows(preset)
    rows += [
        Row(f"adr_pgd_no_{t}", "ablation", "adr_pgd", first, ((t, 0.0),), label=f"adr_pgd - {t}")
        for t in ABLATED_TERMS
    ]
    rows += [
        Row(
            f"adr_pgd_lp{w:g}".replace(".", "p"),
            "ablation",
            "adr_pgd",
            first,
            (("label_propagation", w),),
            label=f"adr_pgd + label_propagation {w:g}",
        )
        for w in LABEL_PROPAGATION_WEIGHTS
    ]
    return rows + variant_rows(preset)


def variant_rows(preset):
    """The rows of `preset.variants`: adr_pgd with each variant's overrides, every seed."""
    first = preset.seeds[0]
    return [
        Row(
            f"adr_pgd_{suffix}" + ("" if s == first else f"_seed{s}"),
            "variant",
            "adr_pgd",
            s,
            tuple(overrides),
            label=f"adr_pgd, {label}" + ("" if s == first else f" (seed {s})"),
        )
        for suffix, label, overrides in preset.variants
        for s in preset.seeds
    ]


def point_rows(preset):
    """The rows of a frontier: every point at the first seed, the seeded points at the others."""
    first, *others = preset.seeds
    by_name = {p.name: p for p in preset.points}
    unknown = set(preset.seeded_points) - set(by_name)
    if unknown:
        raise ValueError(f"seeded_points {sorted(unknown)} are not points of the preset.")

    def row(point, seed, group):
        suffix = "" if seed == first else f"_seed{seed}"
        return Row(
            point.name + suffix,
            group,
            point.defense,
            seed,
            tuple(point.overrides),
            label=point.label + ("" if seed == first else f" (seed {seed})"),
            ema_momentum=point.ema_momentum,
        )

    rows = [row(p, first, p.group) for p in preset.points]
    return rows + [row(by_name[n], s, "seeds") for n in preset.seeded_points for s in others]


def adr_config(preset, row):
    """The row's `ADRConfig`: the preset's training attack, the row's overrides, pinned weights."""
    options = dict(
        attack_epsilon=preset.epsilon,
        attack_steps=preset.attack_steps,
        attack_step_size=preset.step_size,
    )
    return pinned_config(row.defense, **{**options, **dict(row.overrides)})


def eval_options(preset, norm="linf"):
    """`keras_adr.evaluation.evaluate_robustness` options of a preset's evaluation.

    Every model is evaluated in float32, whatever it trained in: the
    precisions are compared on the same footing.
    """
    return dict(
        epsilon=preset.epsilon,
        norm=norm,
        attacks=preset.eval_attacks,
        restarts=preset.restarts,
        seed=preset.eval_seed,
        apgd_targets=preset.apgd_targets,
        precision=BASE_PRECISION,
        standalone_attacks=preset.standalone_attacks,
    )


def fingerprint(preset, row):
    """A hash of everything that determines a row's result (not its description)."""
    row_fields = dataclasses.asdict(row)
    if row.precision == BASE_PRECISION:  # Rows from before the field: still done.
        del row_fields["precision"]
    if not row.ema_momentum:
        del row_fields["ema_momentum"]
    payload = {
        "preset": {
            k: v
            for k, v in dataclasses.asdict(preset).items()
            if k not in _NOT_FINGERPRINTED and _LATER_PRESET_FIELDS.get(k, object()) != v
        },
        "row": row_fields,
        "adr_config": {
            key: value
            # Without `attack.unroll` (speed only), which rows from before it lack.
            for key, value in adr_config(preset, row).result_config().items()
            if _LATER_CONFIG_FIELDS.get(key, object()) != value
        },
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
