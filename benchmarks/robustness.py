"""Robustness benchmark: every defense and the ADR ablations, trained and attacked alike.

Each row trains one model with `keras_adr.pipeline.run` (same architecture,
data, optimiser, epochs and training attack for every row; only the defense,
an ADR weight or the seed changes), then attacks the same test examples with
`keras_adr.evaluation.evaluate_robustness`: clean accuracy, PGD-20, PGD-100,
APGD-CE and targeted APGD-DLR, every randomized attack with `restarts` random
restarts, and the worst case per example over all of them.

Rows:
  * main: `standard`, `pgd_at`, `trades`, `adr_pgd`, `adr_trades` (seed 0);
  * seeds: `pgd_at` and `adr_pgd` again with seeds 1 and 2 (the headline
    comparison is their mean over 3 seeds);
  * ablation: `adr_pgd` with each ADR term switched off in turn, and with
    label propagation on at weight 0.5 and 1.0;
  * precision (a preset with more than one training precision, e.g.
    `precision`): every row once per Keras dtype policy, named
    `<row>_<policy>` (`pgd_at_mixed_bfloat16`, `adr_pgd_seed1_float32`), and
    every model evaluated in float32; the summary compares each policy with
    the first, per defense and seed, per example.

The model evaluated is the checkpoint `pipeline.run` keeps as `best.keras`
(best PGD accuracy on the validation examples held out from the end of the
training subset). With one epoch (the `cpu` preset) that is the final model.

Resumable: every finished row is written at once to
`<results_dir>/<preset>_rows/<row>.json`; a row whose file exists with the
same configuration fingerprint is skipped. Inside a row, a finished training
is reused (a marker in the row's work directory), and an interrupted
multi-epoch training resumes from its last epoch (Keras `BackupAndRestore`
in the row's `output_dir`). A row whose configuration changed is retrained.
After every row the summary `<preset>.json`, `<preset>.md` and `<preset>.png`
are rewritten from all finished rows.

Usage (from the repository root; `python benchmarks/robustness.py` works too):
    nohup nice -n 10 python -m benchmarks.robustness --preset=cpu > robustness_cpu.log 2>&1 &
    python -m benchmarks.robustness --preset=paper_mnist      # GPU machine
    python -m benchmarks.robustness --preset=paper_cifar10 --data_dir=~/tensorflow_datasets
    python -m benchmarks.robustness --preset=cpu --list       # the rows, nothing run
    python -m benchmarks.robustness --preset=cpu --report_only  # rewrite the summary
    python -m benchmarks.robustness --preset=precision --threads=1  # bfloat16 vs float32
"""

import base64
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging

if not __package__:  # `python benchmarks/robustness.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import results_io  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "preset",
    "cpu",
    ["cpu", "fmnist", "precision", "paper_mnist", "paper_cifar10"],
    "Benchmark preset.",
)
flags.DEFINE_string(
    "stability_workdir",
    os.path.join(_REPO, "runs", "benchmarks", "stability"),
    "Work directory of benchmarks/stability.py, whose seed-0 models the fmnist "
    "preset evaluates instead of training them again.",
)
flags.DEFINE_list("rows", None, "Run only these rows (names as --list prints); default all.")
flags.DEFINE_string(
    "results_dir",
    os.path.join(_REPO, "benchmarks", "results"),
    "Where <preset>.json/.md/.png and the per-row files go.",
)
flags.DEFINE_string(
    "workdir",
    None,
    "Training outputs (checkpoints, logs) of each row; default "
    "<repo>/runs/benchmarks/<preset> (git-ignored).",
)
flags.DEFINE_string("data_dir", None, "Dataset directory (IDX files or a TFDS data_dir).")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (2 = one line per epoch).")
flags.DEFINE_bool("list", False, "Print the rows and their status, run nothing.")
flags.DEFINE_integer(
    "threads",
    0,
    "TensorFlow intra-op threads (0 = TensorFlow's choice); "
    "two processes of one thread use 2 cores better than one of two.",
)
flags.DEFINE_bool("report_only", False, "Only rewrite the summary from the finished rows.")
# Overrides of the preset, for smoke tests; they change the fingerprint, so
# use them with another --results_dir.
flags.DEFINE_integer("train_examples", None, "Override the preset's training subset.")
flags.DEFINE_integer("epochs", None, "Override the preset's epochs.")
flags.DEFINE_integer("validation_examples", None, "Override the preset's validation examples.")
flags.DEFINE_integer("test_examples", None, "Override the preset's test examples.")
flags.DEFINE_integer("restarts", None, "Override the preset's evaluation restarts.")
flags.DEFINE_list("eval_attacks", None, "Override the preset's evaluation attacks.")

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
# Examples of the cheap evaluation `pipeline.run` does itself (of the final
# model; recorded as a cross-check of the loaded checkpoint).
PIPELINE_CHECK_EXAMPLES = 128
PIPELINE_CHECK_ATTACKS = ("pgd20", "apgd_ce")
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
        dataset="fashion_mnist",
        model="small_cnn",
        epsilon=0.1,
        attack_steps=5,
        step_size=0.05,
        epochs=10,
        train_examples=None,
        validation_examples=2000,
        batch_size=128,
        optimizer="adam",
        learning_rate=1e-3,
        lr_decay_fractions=(0.5, 0.75),
        weight_decay=0.0,
        test_examples=None,
        eval_attacks=("pgd20", "apgd_ce", "apgd_dlr_t"),
        restarts=1,
        apgd_targets=3,
        budget="9 rows x (about 50 min training + 30 min evaluation) of one core here",
        defenses=("pgd_at", "adr_pgd", "trades", "adr_trades", "adr_pgd_paper"),
        ablation=False,
        reuse_stability=True,
    ),
    # Sized by measurement on a 2-core AMD EPYC (AVX-512) machine shared with
    # other jobs: the 16 rows took 17.4 minutes there (1,712 CPU-seconds; see
    # benchmarks/README.md), so that a 2-core machine 4-5x slower (the one of
    # /work/shared/FACTS.md) still finishes within 100 minutes.
    "cpu": Preset(
        description="Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), "
        "Adam 1e-3 with x0.1 decay at 50%/75% of training, batch 128, 1 epoch on a "
        "training subset",
        dataset="fashion_mnist",
        model="small_cnn",
        epsilon=0.1,
        attack_steps=5,
        step_size=0.05,
        epochs=1,
        train_examples=15_500,
        validation_examples=500,
        batch_size=128,
        optimizer="adam",
        learning_rate=1e-3,
        lr_decay_fractions=(0.5, 0.75),
        weight_decay=0.0,
        test_examples=256,
        eval_attacks=("pgd20", "pgd100", "apgd_ce", "apgd_dlr_t"),
        restarts=2,
        apgd_targets=3,
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


def _tagged(name, precision, preset):
    """`name` of a row (or a defense) trained in `precision`, in `preset`.

    Presets of float32 only keep the names of before the precision axis.
    """
    return name if preset.precisions == (BASE_PRECISION,) else f"{name}_{precision}"


def _precision_of(result):
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
            row, name=_tagged(row.name, p, preset), label=f"{row.label}, {p}", precision=p
        )
        for row in rows
        for p in preset.precisions
    ]


def _base_rows(preset):
    """The rows of a preset, each in the base precision, named as before precisions."""
    first, *others = preset.seeds
    rows = [Row(d, "main", d, first, label=d) for d in preset.defenses]
    rows += [
        Row(f"{d}_seed{s}", "seeds", d, s, label=f"{d} (seed {s})")
        for d in HEADLINE
        for s in others
    ]
    if not preset.ablation:
        return rows
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
    return rows


def effective_preset(name):
    preset = PRESETS[name]
    overrides = {
        k: getattr(FLAGS, k)
        for k in ("train_examples", "epochs", "validation_examples", "test_examples", "restarts")
        if getattr(FLAGS, k) is not None
    }
    if FLAGS.eval_attacks:
        overrides["eval_attacks"] = tuple(FLAGS.eval_attacks)
    return dataclasses.replace(preset, **overrides) if overrides else preset


def adr_config(preset, row):
    from keras_adr import presets

    return presets.get(
        row.defense,
        attack_epsilon=preset.epsilon,
        attack_steps=preset.attack_steps,
        attack_step_size=preset.step_size,
        **dict(row.overrides),
    )


def fingerprint(preset, row):
    """A hash of everything that determines a row's result (not its description)."""
    row_fields = dataclasses.asdict(row)
    if row.precision == BASE_PRECISION:  # Rows from before the field: still done.
        del row_fields["precision"]
    payload = {
        "preset": {
            k: v for k, v in dataclasses.asdict(preset).items() if k not in _NOT_FINGERPRINTED
        },
        "row": row_fields,
        "adr_config": adr_config(preset, row).get_config(),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bits(correct):
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode()


def stability_model(preset, row, config):
    """`(metrics, checkpoint)` of the same model trained by benchmarks/stability.py, or None.

    Only for seed-0 float32 rows without overrides, and only if the stability
    run used exactly this row's `ADRConfig` and training recipe and finished
    all of the preset's epochs.
    """
    if (
        not preset.reuse_stability
        or row.seed != 0
        or row.overrides
        or row.precision != BASE_PRECISION  # stability.py trains in float32
    ):
        return None
    r = results_io.read_json(
        os.path.join(FLAGS.results_dir, "stability_rows", f"{row.defense}.json")
    )
    checkpoint = os.path.join(FLAGS.stability_workdir, row.defense, "best.keras")
    recipe = dict(
        dataset=preset.dataset,
        model=preset.model,
        epsilon=preset.epsilon,
        attack_steps=preset.attack_steps,
        step_size=preset.step_size,
        batch_size=preset.batch_size,
        optimizer=preset.optimizer,
        learning_rate=preset.learning_rate,
        lr_decay_fractions=list(preset.lr_decay_fractions),
        seed=0,
    )
    if (
        not r
        or r.get("adr_config") != config.get_config()
        or {
            **r.get("recipe", {}),
            "lr_decay_fractions": list(r.get("recipe", {}).get("lr_decay_fractions", ())),
        }
        != recipe
        or r.get("epochs_run") != preset.epochs
        or r.get("schedule_epochs") != preset.epochs
        or r.get("validation_examples") != preset.validation_examples
        or preset.train_examples is not None
        or preset.weight_decay
        or not os.path.exists(checkpoint)
    ):
        return None
    history = {k: v for k, v in r["history"].items() if k != "epoch"}
    metrics = {
        "train_examples": r["train_examples"],
        "epochs_run": r["epochs_run"],
        "train_seconds": round(sum(history.get("epoch_seconds", [])), 1),
        "history": history,
        "trained_by": "benchmarks/stability.py",
        "clean_accuracy": None,
        "robust_accuracy": None,
    }
    return metrics, checkpoint


def run_row(preset, row, row_path, workdir):
    """Trains and evaluates one row; writes and returns its result."""
    import keras

    from keras_adr import data, evaluation, pipeline

    started = time.time()  # Of this attempt; a reused training adds its own wall time.
    config = adr_config(preset, row)
    fp = fingerprint(preset, row)
    output_dir = os.path.join(workdir, row.name)
    stamp_path = os.path.join(output_dir, "benchmark_fingerprint.txt")
    trained_path = os.path.join(output_dir, "benchmark_trained.json")
    if os.path.isdir(output_dir):
        try:
            with open(stamp_path) as f:
                same = f.read().strip() == fp
        except OSError:
            same = False
        if not same:  # Another configuration's outputs: never resume from them.
            logging.info("%s: removing stale outputs in %s", row.name, output_dir)
            shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with open(stamp_path, "w") as f:
        f.write(fp + "\n")

    options = pipeline.TrainOptions(
        dataset=preset.dataset,
        model=preset.model,
        defense=row.defense,
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        optimizer=preset.optimizer,
        learning_rate=preset.learning_rate,
        lr_decay_fractions=tuple(preset.lr_decay_fractions),
        weight_decay=preset.weight_decay,
        seed=row.seed,
        train_examples=preset.train_examples,
        validation_examples=preset.validation_examples,
        test_examples=PIPELINE_CHECK_EXAMPLES,
        eval_attacks=PIPELINE_CHECK_ATTACKS,
        output_dir=output_dir,
        data_dir=FLAGS.data_dir,
        export=False,
        verbose=FLAGS.verbose,
        precision=row.precision,
        # A benchmark measures what a defense does: a runaway objective (the
        # paper's ADR) trains to the end, and its best checkpoint is evaluated.
        divergence_factor=0.0,
        command=" ".join(sys.argv) + f"  # row {row.name}",
    )

    trained = results_io.read_json(trained_path)
    reused = bool(trained) and trained.get("fingerprint") == fp
    from_stability = None if reused else stability_model(preset, row, config)
    if from_stability:
        logging.info("%s: evaluating the model benchmarks/stability.py trained", row.name)
        metrics, checkpoint = from_stability
        trained = {"wall_seconds": metrics["train_seconds"]}
        reused = True
    elif reused:
        logging.info("%s: training already finished, evaluating", row.name)
        metrics = trained["metrics"]
    else:
        logging.info(
            "%s: training %s (seed %d, overrides %s, precision %s)",
            row.name,
            row.defense,
            row.seed,
            dict(row.overrides) or "none",
            row.precision,
        )
        try:
            metrics = pipeline.run(options, config)
        except pipeline.TrainingDivergedError as error:  # a non-finite loss stopped it
            history = pipeline.read_history(os.path.join(output_dir, "history.csv"))
            metrics = {
                "diverged": str(error),
                "train_examples": None,
                "epochs_run": len(history.get("loss", [])),
                "train_seconds": round(
                    sum(v for v in history.get("epoch_seconds", []) if v is not None), 1
                ),
                "history": {
                    k: v for k, v in history.items() if k not in ("epoch", "epoch_seconds")
                },
            }
            logging.warning("%s: %s; evaluating its best checkpoint", row.name, error)
        results_io.write_json_atomic(
            trained_path,
            {
                "fingerprint": fp,
                "metrics": metrics,
                "wall_seconds": round(time.time() - started, 1),
            },
        )
        trained = results_io.read_json(trained_path)

    if not from_stability:
        checkpoint = os.path.join(output_dir, "best.keras")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"{row.name}: pipeline.run left no {checkpoint}.")
    test = data.load(
        preset.dataset, "test", batch_size=256, data_dir=FLAGS.data_dir, take=preset.test_examples
    )
    eval_started = time.time()
    result = evaluation.evaluate_robustness(
        checkpoint,
        test,
        epsilon=preset.epsilon,
        norm=config.attack.norm,
        attacks=preset.eval_attacks,
        restarts=preset.restarts,
        seed=preset.eval_seed,
        apgd_targets=preset.apgd_targets,
        # A float32 copy of the weights, whatever the row trained in: the
        # precisions are compared on the same footing.
        precision=BASE_PRECISION,
    )
    eval_seconds = time.time() - eval_started
    checks = evaluation.sanity_checks(result)

    history = metrics.get("history", {})
    payload = {
        "name": row.name,
        "group": row.group,
        "label": row.label,
        "defense": row.defense,
        "seed": row.seed,
        "overrides": dict(row.overrides),
        "precision": row.precision,
        # The pipeline's record (requested, training, evaluation, export policies).
        "precision_record": metrics.get("precision"),
        "evaluation_precision": BASE_PRECISION,
        "fingerprint": fp,
        "preset": FLAGS.preset,
        "adr_config": config.get_config(),
        "train_examples": metrics.get("train_examples"),
        "epochs_run": metrics.get("epochs_run"),
        "train_seconds": metrics.get("train_seconds"),
        "eval_seconds": round(eval_seconds, 1),
        # Training (possibly in an earlier, interrupted attempt) + evaluation + overhead.
        "row_seconds": round(
            (trained.get("wall_seconds", 0.0) if reused else 0.0) + time.time() - started, 1
        ),
        "final_epoch": {k: v[-1] for k, v in history.items() if v},
        "clean_accuracy": result.clean_accuracy,
        "attack_accuracy": result.attack_accuracy,
        "robust_accuracy": result.robust_accuracy,
        "evaluation": result.to_dict(),
        "sanity_checks": [c.to_dict() for c in checks],
        # Per-example outcomes (numpy.packbits, base64) for paired comparisons.
        "clean_correct_bits": _bits(result.clean_correct),
        "robust_correct_bits": _bits(result.robust_correct),
        "pipeline_check": {
            "examples": PIPELINE_CHECK_EXAMPLES,
            "attacks": list(PIPELINE_CHECK_ATTACKS),
            "clean_accuracy": metrics.get("clean_accuracy"),
            "robust_accuracy": metrics.get("robust_accuracy"),
        },
        "checkpoint": os.path.relpath(checkpoint, _REPO),
        "trained_by": metrics.get("trained_by", "keras_adr.pipeline.run"),
        "diverged": metrics.get("diverged"),
        "history": history,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": results_io.machine_info(),
    }
    results_io.write_json_atomic(row_path, payload)
    keras.backend.clear_session()
    gc.collect()
    return payload


# --- Summary -------------------------------------------------------------------


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    array = np.asarray(values, float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(array),
    }


def seed_summary(results, preset):
    """Mean, sample std and min-max over seeds of the headline defenses, per precision.

    Keyed by defense, tagged with the precision as the rows' names are.
    """
    summary = {}
    for defense, precision_ in ((d, p) for d in HEADLINE for p in preset.precisions):
        runs = [
            r
            for r in results
            if r["defense"] == defense and not r["overrides"] and _precision_of(r) == precision_
        ]
        if not runs:
            continue
        entry = {
            "seeds": sorted(r["seed"] for r in runs),
            "clean_accuracy": _stats([r["clean_accuracy"] for r in runs]),
            "robust_accuracy": _stats([r["robust_accuracy"] for r in runs]),
            "train_seconds": _stats([r["train_seconds"] for r in runs]),
        }
        for attack in preset.eval_attacks:
            entry[attack] = _stats([r["attack_accuracy"].get(attack) for r in runs])
        summary[_tagged(defense, precision_, preset)] = entry
    return summary


def _unbits(text, n):
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def _sign_test(b, c):
    """Exact two-sided binomial (McNemar) p-value of b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _discordant(a, b):
    """`{"clean"|"worst case": [correct only in a, correct only in b]}` of two rows
    evaluated on the same examples, or None without their per-example bits."""
    n = a["evaluation"]["num_examples"]
    counts = {}
    for what, key in (("clean", "clean_correct_bits"), ("worst case", "robust_correct_bits")):
        if key not in a or key not in b:
            return None
        x, y = _unbits(a[key], n), _unbits(b[key], n)
        counts[what] = [int(np.sum(x & ~y)), int(np.sum(~x & y))]
    return counts


def paired_comparison(results):
    """Per-example discordance of adr_pgd vs pgd_at over seed- and precision-matched runs."""
    runs = {(r["defense"], r["seed"], _precision_of(r)): r for r in results if not r["overrides"]}
    counts = {"clean": [0, 0], "worst case": [0, 0]}
    for (defense, seed, precision_), a in runs.items():
        b = runs.get(("pgd_at", seed, precision_))
        if defense != "adr_pgd" or b is None:
            continue
        pair = _discordant(a, b)
        if pair is None:
            return None
        for what, (a_only, b_only) in pair.items():
            counts[what][0] += a_only
            counts[what][1] += b_only
    if not any(sum(c) for c in counts.values()):
        return None
    return {
        what: {"adr_only": c[0], "pgd_at_only": c[1], "p_value": _sign_test(*c)}
        for what, c in counts.items()
    }


def _pair_stats(a, b, reference, other):
    """`{reference: a, other: b, "difference": b - a}`, or None if either is missing."""
    if a is None or b is None:
        return None
    return {reference: a, other: b, "difference": b - a}


def _sign_tested(counts, reference, other):
    """Discordant counts `{what: [reference only, other only]}` with their sign tests."""
    return {
        what: {f"{reference}_only": c[0], f"{other}_only": c[1], "p_value": _sign_test(*c)}
        for what, c in counts.items()
    }


def precision_comparison(results, preset):
    """Each training precision against the first, per defense and seed, and over seeds.

    Pairs are rows of the same defense and seed without overrides, all
    evaluated in float32 on the same examples. Differences are other minus
    reference; `paired` counts the test examples correct with only one model
    of a pair (pooled over seeds in `mean`), with the exact two-sided sign test.

    Returns:
        `{"reference": ..., "comparisons": {precision: {defense: {"seeds":
        [per seed], "mean": {over seeds}}}}}`, or None for a preset of one
        precision.
    """
    if len(preset.precisions) < 2:
        return None
    reference, *others = preset.precisions
    runs = {(r["defense"], r["seed"], _precision_of(r)): r for r in results if not r["overrides"]}
    defenses = dict.fromkeys(defense for defense, _, _ in runs)
    seeds = sorted({seed for _, seed, _ in runs})
    keys = ("clean_accuracy", "robust_accuracy", "train_seconds")
    comparisons = {}
    for other in others:
        by_defense = {}
        for defense in defenses:
            pairs = [
                (runs[(defense, seed, reference)], runs[(defense, seed, other)])
                for seed in seeds
                if (defense, seed, reference) in runs and (defense, seed, other) in runs
            ]
            if not pairs:
                continue
            per_seed, pooled = [], {"clean": [0, 0], "worst case": [0, 0]}
            for a, b in pairs:
                entry = {"seed": a["seed"]}
                for key in keys:
                    entry[key] = _pair_stats(a.get(key), b.get(key), reference, other)
                entry["attack_accuracy"] = {
                    attack: _pair_stats(
                        a["attack_accuracy"].get(attack),
                        b["attack_accuracy"].get(attack),
                        reference,
                        other,
                    )
                    for attack in preset.eval_attacks
                }
                counts = _discordant(a, b)
                entry["paired"] = counts and _sign_tested(counts, reference, other)
                for what, (a_only, b_only) in (counts or {}).items():
                    pooled[what][0] += a_only
                    pooled[what][1] += b_only
                per_seed.append(entry)
            mean = {"seeds": [e["seed"] for e in per_seed]}
            for key in keys:
                values = [e[key] for e in per_seed]
                mean[key] = (
                    None
                    if None in values
                    else _pair_stats(
                        float(np.mean([v[reference] for v in values])),
                        float(np.mean([v[other] for v in values])),
                        reference,
                        other,
                    )
                )
            # Pooled only over seeds that all have per-example bits.
            complete = all(e["paired"] for e in per_seed)
            mean["paired"] = _sign_tested(pooled, reference, other) if complete else None
            by_defense[defense] = {"seeds": per_seed, "mean": mean}
        comparisons[other] = by_defense
    return {"reference": reference, "comparisons": comparisons}


def verdict(seeds, expected_seeds, results=()):
    a, b = seeds.get("adr_pgd"), seeds.get("pgd_at")
    if not a or not b:
        return None
    clean_ok = a["clean_accuracy"]["mean"] >= b["clean_accuracy"]["mean"]
    robust_ok = a["robust_accuracy"]["mean"] >= b["robust_accuracy"]["mean"]
    complete = len(a["seeds"]) == len(b["seeds"]) == expected_seeds
    return {
        "adr_pgd_clean_ge_pgd_at": clean_ok,
        "adr_pgd_robust_ge_pgd_at": robust_ok,
        "both": clean_ok and robust_ok,
        "seeds_complete": complete,
        # Issue 9's bar: +1 point worst case, at most 0.5 points of clean accuracy lost.
        "meets_target": (
            a["robust_accuracy"]["mean"] - b["robust_accuracy"]["mean"] >= 0.01
            and a["clean_accuracy"]["mean"] - b["clean_accuracy"]["mean"] >= -0.005
        ),
        "clean_difference": a["clean_accuracy"]["mean"] - b["clean_accuracy"]["mean"],
        "robust_difference": a["robust_accuracy"]["mean"] - b["robust_accuracy"]["mean"],
        "paired": paired_comparison(results),
    }


def markdown(preset_name, preset, rows, results, seeds, verdict_, total_seconds, comparison=None):
    by_name = {r["name"]: r for r in results}
    attacks = list(preset.eval_attacks)
    first = results[0] if results else {}
    n_test = first.get("evaluation", {}).get("num_examples", preset.test_examples)
    lines = [
        f"# Robustness benchmark: `{preset_name}`",
        "",
        f"- Setup: {preset.description}.",
        f"- Training examples: {first.get('train_examples', '?')} (the first "
        f"{preset.train_examples or 'examples'} of train minus the last "
        f"{preset.validation_examples}, held out for checkpoint selection); evaluated "
        "checkpoint: the run's `best.keras` (best validation PGD accuracy; with 1 epoch, the "
        "final model), trained by `pipeline.run` or, for seed-0 rows of the same recipe, by "
        "`benchmarks/stability.py` (column `trained by`).",
        f"- Evaluation: the first {n_test} test examples, L-inf epsilon {preset.epsilon:g}; "
        f"{', '.join(attacks)}; {preset.restarts} random start(s) of every randomized attack "
        f"(APGD-T: {preset.restarts} per target class, {preset.apgd_targets} target classes); "
        "PGD step 2.5·eps/steps; APGD steps as named (default 100). **Worst case** = correct "
        "under every attack and restart (per example). Accuracies in %.",
        f"- Rows finished: {len(results)}/{len(rows)}; total wall time of the finished rows "
        f"(training + evaluation + overhead): {total_seconds / 60:.1f} min.",
    ]
    if preset.precisions != (BASE_PRECISION,):
        lines.append(
            f"- Training precision: every row in each of {', '.join(preset.precisions)} (Keras "
            "dtype policies; the mixed ones compute in 16 bits and keep float32 weights), named "
            f"after it; every model evaluated in {BASE_PRECISION} (a {BASE_PRECISION} copy of "
            "its weights)."
        )
    if first.get("machine"):
        m = first["machine"]
        lines.append(
            f"- Machine: {m['cpu']}, {m['cpus']} CPUs, GPUs: {m['gpus'] or 'none'}; "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}."
        )
    table = []
    for row in rows:
        r = by_name.get(row.name)
        if r is None:
            table.append([row.label, row.seed, "(pending)"] + [""] * (len(attacks) + 4))
            continue
        table.append(
            [
                row.label,
                r["seed"],
                _pct(r["clean_accuracy"]),
                *(_pct(r["attack_accuracy"].get(a)) for a in attacks),
                f"**{_pct(r['robust_accuracy'])}**",
                f"{r['train_seconds']:.0f}",
                f"{r['eval_seconds']:.0f}",
                os.path.basename(r.get("trained_by", "keras_adr.pipeline.run")),
            ]
        )
    lines += [
        "",
        "## All rows",
        "",
        *results_io.markdown_table(
            ["row", "seed", "clean", *attacks, "worst case", "train s", "eval s", "trained by"],
            table,
            align="lrr" + "r" * len(attacks) + "rrrl",
        ),
    ]
    if seeds:
        fmt = lambda st: (
            "-"
            if st is None
            else f"{100 * st['mean']:.1f} ± "
            f"{100 * st['std']:.1f} [{100 * st['min']:.1f}–{100 * st['max']:.1f}]"
        )
        table = [
            [
                defense,
                ",".join(map(str, s["seeds"])),
                fmt(s["clean_accuracy"]),
                *(fmt(s.get(a)) for a in attacks),
                f"**{fmt(s['robust_accuracy'])}**",
                f"{s['train_seconds']['mean']:.0f}",
            ]
            for defense, s in seeds.items()
        ]
        lines += [
            "",
            "## Headline: mean over seeds",
            "",
            "mean ± sample standard deviation [min–max] over the seeds listed.",
            "",
            *results_io.markdown_table(
                ["defense", "seeds", "clean", *attacks, "worst case", "train s"],
                table,
                align="llr" + "r" * len(attacks) + "rr",
            ),
        ]
    if verdict_:
        yes = lambda ok: "yes" if ok else "**no**"
        incomplete = "" if verdict_["seeds_complete"] else ", seeds incomplete"
        lines += [
            "",
            f"**adr_pgd >= pgd_at** (means over seeds{incomplete}): clean "
            f"{yes(verdict_['adr_pgd_clean_ge_pgd_at'])} "
            f"({100 * verdict_['clean_difference']:+.1f} points), worst-case robust "
            f"{yes(verdict_['adr_pgd_robust_ge_pgd_at'])} "
            f"({100 * verdict_['robust_difference']:+.1f} points). Target (adr_pgd at "
            "least +1.0 point worst case with clean accuracy at most 0.5 points lower): "
            f"{yes(verdict_['meets_target'])}.",
        ]
        paired = verdict_.get("paired")
        if paired:
            lines += [
                "",
                "Paired per-example comparison (same test examples, seed-matched runs, "
                "pooled over seeds; exact two-sided sign test on the discordant examples): "
                + "; ".join(
                    f"{what}: {p['adr_only']} examples correct only with adr_pgd, "
                    f"{p['pgd_at_only']} only with pgd_at, p = {p['p_value']:.2f}"
                    for what, p in paired.items()
                )
                + ".",
            ]
    if comparison:
        lines += _precision_markdown(comparison, n_test)
    base = by_name.get("adr_pgd")
    ablations = [row for row in rows if row.group == "ablation" and row.name in by_name]
    if base and ablations:
        table = [
            [
                row.label,
                _pct(r["clean_accuracy"]),
                f"{100 * (r['clean_accuracy'] - base['clean_accuracy']):+.1f}",
                _pct(r["robust_accuracy"]),
                f"{100 * (r['robust_accuracy'] - base['robust_accuracy']):+.1f}",
            ]
            for row, r in ((row, by_name[row.name]) for row in ablations)
        ]
        lines += [
            "",
            "## Ablation of adr_pgd (seed 0): change against adr_pgd",
            "",
            *results_io.markdown_table(
                ["row", "clean", "Δ clean", "worst case", "Δ worst case"], table
            ),
        ]
    failed = [
        (r["name"], c["name"])
        for r in results
        for c in r.get("sanity_checks", [])
        if c["status"] == "failed"
    ]
    lines += [
        "",
        "Sanity checks (`keras_adr.evaluation.sanity_checks` per row): "
        + (
            "all passed or skipped."
            if not failed
            else "**FAILED**: " + ", ".join(f"{n}: {c}" for n, c in failed)
        ),
    ]
    return "\n".join(lines) + "\n"


def _precision_markdown(comparison, n_test):
    """The section of `precision_comparison`: a table per compared precision."""
    reference = comparison["reference"]
    points = lambda st: "-" if st is None else f"{100 * st['difference']:+.1f}"

    def discordant(paired, what, other):
        if not paired:
            return "-"
        p = paired[what]
        return f"{p[f'{reference}_only']} / {p[f'{other}_only']} (p = {p['p_value']:.2f})"

    lines = []
    for other, by_defense in comparison["comparisons"].items():
        table = []
        for defense, c in by_defense.items():
            for label, e in [(str(e["seed"]), e) for e in c["seeds"]] + [
                (f"**mean** ({', '.join(map(str, c['mean']['seeds']))})", c["mean"])
            ]:
                clean, robust, train = (
                    e[k] for k in ("clean_accuracy", "robust_accuracy", "train_seconds")
                )
                table.append(
                    [
                        defense,
                        label,
                        _pct(clean and clean[reference]),
                        _pct(clean and clean[other]),
                        points(clean),
                        _pct(robust and robust[reference]),
                        _pct(robust and robust[other]),
                        f"**{points(robust)}**",
                        discordant(e["paired"], "clean", other),
                        discordant(e["paired"], "worst case", other),
                        "-" if train is None else f"{train[reference]:.0f} / {train[other]:.0f}",
                    ]
                )
        lines += [
            "",
            f"## Training precision: {other} against {reference}",
            "",
            f"Every model evaluated in {BASE_PRECISION} on the same {n_test} test examples with "
            f"the same attacks. Δ = {other} − {reference}, in points. Discordant: test examples "
            f"correct (clean, or under every attack) with only the {reference} / only the "
            f"{other} model of a pair (pooled over seeds in the mean rows); p: exact two-sided "
            "sign test on them.",
            "",
            *results_io.markdown_table(
                [
                    "defense",
                    "seed",
                    f"clean {reference}",
                    f"clean {other}",
                    "Δ clean",
                    f"worst case {reference}",
                    f"worst case {other}",
                    "Δ worst case",
                    f"clean: only {reference} / only {other}",
                    f"worst case: only {reference} / only {other}",
                    f"train s {reference} / {other}",
                ],
                table,
                align="llrrrrrrrrr",
            ),
        ]
    return lines


def plot(preset_name, rows, results, seeds, path):
    from matplotlib.figure import Figure

    by_name = {r["name"]: r for r in results}
    shown = [row for row in rows if row.name in by_name]
    if not shown:
        return
    figure = Figure(figsize=(8, 0.45 * len(shown) + 1.8), dpi=110)
    axes = figure.add_subplot()
    positions = np.arange(len(shown))[::-1]
    clean = [100 * by_name[row.name]["clean_accuracy"] for row in shown]
    robust = [100 * by_name[row.name]["robust_accuracy"] for row in shown]
    axes.barh(positions + 0.2, clean, height=0.4, color="#9ecae1", label="clean")
    axes.barh(positions - 0.2, robust, height=0.4, color="#08519c", label="worst case")
    for defense, s in seeds.items():
        if defense in by_name:
            y = positions[shown.index(next(r for r in shown if r.name == defense))]
            for offset, key, color in (
                (0.2, "clean_accuracy", "#555555"),
                (-0.2, "robust_accuracy", "black"),
            ):
                st = s[key]
                axes.errorbar(
                    100 * st["mean"],
                    y + offset,
                    color=color,
                    capsize=3,
                    marker="|",
                    xerr=[
                        [max(0.0, 100 * (st["mean"] - st["min"]))],
                        [max(0.0, 100 * (st["max"] - st["mean"]))],
                    ],
                )
    axes.set_yticks(positions, [row.label for row in shown], fontsize="small")
    axes.set_xlabel(
        "accuracy (%)  —  bars: seed 0; whiskers on pgd_at / adr_pgd: mean and min–max over seeds",
        fontsize="small",
    )
    axes.set_xlim(0, 100)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(f"Robustness benchmark: {preset_name}")
    figure.tight_layout()
    figure.savefig(path)


def write_summary(preset_name, preset, rows, rows_dir):
    results = []
    fingerprints = {row.name: fingerprint(preset, row) for row in rows}
    for row in rows:
        r = results_io.read_json(os.path.join(rows_dir, f"{row.name}.json"))
        if r and r.get("fingerprint") == fingerprints[row.name]:
            results.append(r)
    seeds = seed_summary(results, preset)
    verdict_ = verdict(seeds, len(preset.seeds), results)
    comparison = precision_comparison(results, preset)
    total = sum(r["row_seconds"] for r in results)
    base = os.path.join(FLAGS.results_dir, preset_name)
    compact = [{k: v for k, v in r.items() if not k.endswith("_bits")} for r in results]
    summary = {
        "preset": preset_name,
        "settings": dataclasses.asdict(preset),
        "rows_expected": [row.name for row in rows],
        "rows": compact,
        "seed_summary": seeds,
        "spread": "sample std (ddof=1) and min-max over seeds",
        "verdict": verdict_,
        "total_row_seconds": round(total, 1),
    }
    if comparison:  # Presets of one precision keep their summary as it was.
        summary["precision_comparison"] = comparison
    results_io.write_json_atomic(f"{base}.json", summary)
    results_io.write_text(
        f"{base}.md",
        markdown(preset_name, preset, rows, results, seeds, verdict_, total, comparison),
    )
    try:
        plot(preset_name, rows, results, seeds, f"{base}.png")
    except Exception:  # noqa: BLE001 - a plotting problem must not stop the benchmark
        logging.exception("could not draw %s.png", base)
    return results


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    preset = effective_preset(FLAGS.preset)
    rows = rows_of(preset)
    if FLAGS.rows:
        unknown = set(FLAGS.rows) - {row.name for row in rows}
        if unknown:
            raise app.UsageError(f"Unknown rows {sorted(unknown)}; rows: {[r.name for r in rows]}")
    selected = [row for row in rows if not FLAGS.rows or row.name in FLAGS.rows]
    rows_dir = os.path.join(FLAGS.results_dir, f"{FLAGS.preset}_rows")
    workdir = FLAGS.workdir or os.path.join(_REPO, "runs", "benchmarks", FLAGS.preset)
    os.makedirs(rows_dir, exist_ok=True)

    def done(row):
        r = results_io.read_json(os.path.join(rows_dir, f"{row.name}.json"))
        return bool(r) and r.get("fingerprint") == fingerprint(preset, row)

    if FLAGS.list:
        for row in rows:
            print(
                f"{row.name:32s} {row.group:9s} seed={row.seed} {row.precision:14s} "
                f"{'done' if done(row) else 'pending'}  {dict(row.overrides) or ''}"
            )
        return
    if not FLAGS.report_only:
        for index, row in enumerate(selected):
            if done(row):
                logging.info(
                    "[%d/%d] %s: done already, skipped", index + 1, len(selected), row.name
                )
                continue
            logging.info("[%d/%d] %s", index + 1, len(selected), row.name)
            r = run_row(preset, row, os.path.join(rows_dir, f"{row.name}.json"), workdir)
            logging.info(
                "[%d/%d] %s: clean %.2f%%, worst case %.2f%% (%s), train %.0fs, eval %.0fs",
                index + 1,
                len(selected),
                row.name,
                100 * r["clean_accuracy"],
                100 * r["robust_accuracy"],
                ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["attack_accuracy"].items()),
                r["train_seconds"],
                r["eval_seconds"],
            )
            write_summary(FLAGS.preset, preset, rows, rows_dir)
    results = write_summary(FLAGS.preset, preset, rows, rows_dir)
    logging.info(
        "%d/%d rows finished; summary in %s.{json,md,png}",
        len(results),
        len(rows),
        os.path.join(FLAGS.results_dir, FLAGS.preset),
    )


if __name__ == "__main__":
    app.run(main)
