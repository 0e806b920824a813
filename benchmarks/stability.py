"""Stability study: does an ADR objective stay bounded over a real training budget?

Every run trains the small CNN on Fashion-MNIST with the same recipe (the one
of `robustness.py --preset=fmnist`: L-inf epsilon 0.1, PGD-5 of step 0.05,
Adam 1e-3 with x0.1 decay at 50% and 75% of training, batch 128, the last
2,000 training images held out) for at least `--steps` steps, and records per
epoch: the total loss, every term, the mean L2 norm of the clean latent codes
`z` and logits (`latent_norm`, `logits_norm`), clean and adversarial training
accuracy, and clean and PGD-5 accuracy on the held-out validation images. No
test image is used: this study chooses the formulation.

Runs:
  * main (the whole budget): `pgd_at`, `adr_pgd_paper` (the authors'
    objective), `adr_pgd` (the bounded formulation) and the bounded
    formulation without conditional entropy;
  * ablation (the first `--ablation_epochs` epochs of the same schedule): the
    paper's objective without global smoothness (the authors' README
    setting), each half of the fix alone (RMS-normalised codes; the overlap
    push), each ADR term alone on top of PGD-AT (paper formulation), and
    `adr_pgd_paper` without each term.

Each run keeps `best.keras` (best validation PGD-5 accuracy) and `final.keras`
in its work directory, so `robustness.py --preset=fmnist` can evaluate the
seed-0 models without training them again.

Resumable: each finished run is written to `<results_dir>/stability_rows/
<run>.json`; an interrupted run resumes from its last finished epoch (Keras
`BackupAndRestore` in `<workdir>/<run>`). The summary `stability.{json,md,png}`
is rewritten after every run.

Usage (from the repository root; two processes of one thread each use the two
cores better than one of two threads for this small model; `python
benchmarks/stability.py` works too):
    nohup nice python -m benchmarks.stability --group=main --threads=1 > stab1.log 2>&1 &
    python -m benchmarks.stability --list
    python -m benchmarks.stability --report_only
"""

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

from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # `python benchmarks/stability.py`: import as `python -m` would.
    sys.path[0] = _REPO
from benchmarks import results_io  # noqa: E402
from benchmarks.robustness_presets import PGD5_RECIPE, pinned_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "steps",
    4500,
    "Minimum training steps of a main run (whole epochs); "
    "also sets the learning-rate schedule of the ablation runs.",
)
flags.DEFINE_integer(
    "ablation_epochs",
    4,
    "Ablation runs stop after this many epochs of the "
    "main runs' schedule (the paper's objective runs away by then).",
)
flags.DEFINE_enum("group", None, ["main", "ablation"], "Run only this group; default all.")
flags.DEFINE_list("runs", None, "Run only these runs (names as --list prints).")
flags.DEFINE_string(
    "results_dir",
    os.path.join(_REPO, "benchmarks", "results"),
    "Where stability.{json,md,png} and stability_rows/ go.",
)
flags.DEFINE_string(
    "workdir",
    os.path.join(_REPO, "runs", "benchmarks", "stability"),
    "Checkpoints and logs of each run (git-ignored).",
)
flags.DEFINE_string("data_dir", None, "Dataset directory (IDX files).")
flags.DEFINE_integer("train_examples", None, "Smoke tests: use the first N training images.")
flags.DEFINE_integer(
    "validation_examples", PGD5_RECIPE.validation_examples, "Held out from the end of train."
)
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0 = TensorFlow's choice).")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity.")
flags.DEFINE_bool("list", False, "Print the runs and their status, run nothing.")
flags.DEFINE_float(
    "collapse_accuracy",
    0.15,
    "A run stops after an epoch whose clean "
    "validation accuracy is at most this (10 classes: chance is 0.10); 0 = never.",
)
flags.DEFINE_bool("report_only", False, "Only rewrite the summary from finished runs.")

# The studies' training recipe (robustness_presets.PGD5_RECIPE: the library's
# PGD-5 recipe, pinned), in the form this study's results and fingerprints
# record it.
RECIPE = dict(
    dataset=PGD5_RECIPE.dataset,
    model=PGD5_RECIPE.model,
    epsilon=PGD5_RECIPE.epsilon,
    attack_steps=PGD5_RECIPE.attack_steps,
    step_size=PGD5_RECIPE.attack_step_size,
    batch_size=PGD5_RECIPE.batch_size,
    optimizer=PGD5_RECIPE.optimizer,
    learning_rate=PGD5_RECIPE.learning_rate,
    lr_decay_fractions=PGD5_RECIPE.lr_decay_fractions,
    seed=PGD5_RECIPE.seed,
)
TERMS = (
    "local_compactness",
    "local_smoothness",
    "global_compactness",
    "global_smoothness",
    "conditional_entropy",
)
PAPER = dict(latent_normalization="none", smoothness_push="cross_entropy")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    group: str
    defense: str
    overrides: tuple = ()
    label: str = ""


def runs():
    main = [
        Run("adr_pgd", "main", "adr_pgd", label="adr_pgd (bounded: rms codes + overlap push)"),
        Run("pgd_at", "main", "pgd_at", label="pgd_at"),
        Run("adr_pgd_paper", "main", "adr_pgd_paper", label="adr_pgd_paper (authors' objective)"),
        Run(
            "adr_pgd_no_conditional_entropy",
            "main",
            "adr_pgd",
            (("conditional_entropy", 0.0),),
            label="adr_pgd, conditional_entropy 0",
        ),
    ]
    halves = [
        Run(
            "adr_pgd_paper_no_global_smoothness",
            "ablation",
            "adr_pgd_paper",
            (("global_smoothness", 0.0),),
            label="adr_pgd_paper, global_smoothness 0",
        ),
        Run(
            "adr_pgd_rms_only",
            "ablation",
            "adr_pgd",
            (("smoothness_push", "cross_entropy"),),
            label="rms codes, paper push",
        ),
        Run(
            "adr_pgd_overlap_only",
            "ablation",
            "adr_pgd",
            (("latent_normalization", "none"),),
            label="raw codes, overlap push",
        ),
    ]
    alone = [
        Run(
            f"pgd_at_plus_{t}",
            "ablation",
            "pgd_at",
            ((t, 1.0),) + tuple(PAPER.items()),
            label=f"pgd_at + {t} (paper)",
        )
        for t in TERMS
    ]
    without = [
        Run(
            f"adr_pgd_paper_no_{t}",
            "ablation",
            "adr_pgd_paper",
            ((t, 0.0),),
            label=f"adr_pgd_paper - {t}",
        )
        for t in TERMS
        if t != "global_smoothness"
    ]
    return main + halves + alone + without


def adr_config(run):
    return pinned_config(
        run.defense,
        attack_epsilon=RECIPE["epsilon"],
        attack_steps=RECIPE["attack_steps"],
        attack_step_size=RECIPE["step_size"],
        **dict(run.overrides),
    )


def fingerprint(run, epochs):
    payload = {
        "recipe": RECIPE,
        "epochs": epochs,
        "stop_epoch": _stop_epoch(run, epochs),
        "train_examples": FLAGS.train_examples,
        "validation_examples": FLAGS.validation_examples,
        # Without `attack.unroll` (speed only), which runs from before it lack.
        "adr_config": adr_config(run).result_config(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stop_epoch(run, epochs):
    return epochs if run.group == "main" else min(epochs, FLAGS.ablation_epochs)


def _plan():
    """`(num_train, steps_per_epoch, epochs)` of every run."""
    from keras_adr import data

    total = FLAGS.train_examples or data.info(RECIPE["dataset"]).num_train
    num_train = total - FLAGS.validation_examples
    steps_per_epoch = math.ceil(num_train / RECIPE["batch_size"])
    return num_train, steps_per_epoch, math.ceil(FLAGS.steps / steps_per_epoch)


class _StopCollapsed:
    """Stops a run whose model has collapsed to chance: the rest would be wasted compute."""

    def __new__(cls, threshold):
        import keras

        class StopCollapsed(keras.callbacks.Callback):
            collapsed_epoch = None

            def on_epoch_end(self, epoch, logs=None):
                accuracy = (logs or {}).get("val_accuracy")
                if threshold and accuracy is not None and accuracy <= threshold:
                    self.collapsed_epoch = epoch + 1
                    self.model.stop_training = True

        return StopCollapsed()


def train_run(run, row_path):
    import keras

    from keras_adr import callbacks as adr_callbacks
    from keras_adr import data, models, pipeline
    from keras_adr.adr_model import ADRModel

    num_train, steps_per_epoch, epochs = _plan()
    fp = fingerprint(run, epochs)
    out = os.path.join(FLAGS.workdir, run.name)
    stamp = os.path.join(out, "fingerprint.txt")
    if os.path.isdir(out) and (not os.path.exists(stamp) or open(stamp).read().strip() != fp):
        logging.info("%s: removing outputs of another configuration", run.name)
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(stamp, "w") as f:
        f.write(fp + "\n")

    keras.utils.set_random_seed(RECIPE["seed"])
    total = num_train + FLAGS.validation_examples
    load = lambda split, **kw: data.load(
        RECIPE["dataset"],
        split,
        batch_size=RECIPE["batch_size"],
        data_dir=FLAGS.data_dir,
        seed=RECIPE["seed"],
        **kw,
    )
    train_ds = load(f"train[:{num_train}]", shuffle=True)
    validation_ds = load(f"train[{num_train}:{total}]")
    config = adr_config(run)
    model = ADRModel(models.small_cnn(), config)
    options = pipeline.TrainOptions(
        epochs=epochs,
        optimizer=RECIPE["optimizer"],
        learning_rate=RECIPE["learning_rate"],
        lr_decay_fractions=RECIPE["lr_decay_fractions"],
    )
    model.compile(optimizer=pipeline.build_optimizer(options, steps_per_epoch))
    history_path = os.path.join(out, "history.csv")
    started = time.time()
    # The schedule is that of `epochs`; ablation runs stop early (a prefix).
    collapse = _StopCollapsed(FLAGS.collapse_accuracy)
    # shuffle=False: the dataset shuffles itself; Keras' flag would only warn.
    model.fit(
        train_ds,
        epochs=_stop_epoch(run, epochs),
        validation_data=validation_ds,
        verbose=FLAGS.verbose,
        shuffle=False,
        callbacks=[
            adr_callbacks.AtomicBackupAndRestore(os.path.join(out, "backup")),
            adr_callbacks.EpochSeconds(),
            keras.callbacks.TerminateOnNaN(),
            collapse,
            adr_callbacks.AtomicModelCheckpoint(
                os.path.join(out, "best.keras"),
                monitor="val_adv_accuracy",
                mode="max",
                save_best_only=True,
            ),
            keras.callbacks.CSVLogger(history_path, append=True),
        ],
    )
    model.save(os.path.join(out, "final.keras"))
    history = pipeline.read_history(history_path)
    payload = {
        "name": run.name,
        "group": run.group,
        "label": run.label,
        "defense": run.defense,
        "overrides": dict(run.overrides),
        "fingerprint": fp,
        "adr_config": config.get_config(),
        "recipe": RECIPE,
        "train_examples": num_train,
        "validation_examples": FLAGS.validation_examples,
        "steps_per_epoch": steps_per_epoch,
        "epochs_planned": _stop_epoch(run, epochs),
        "schedule_epochs": epochs,
        "epochs_run": len(history.get("epoch", [])),
        "collapsed_at_epoch": _collapsed_epoch(history, FLAGS.collapse_accuracy),
        "history": history,
        "wall_seconds_this_attempt": round(time.time() - started, 1),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
    }
    results_io.write_json_atomic(row_path, payload)
    keras.backend.clear_session()
    gc.collect()
    return payload


def _collapsed_epoch(history, threshold):
    """First (1-based) epoch whose clean validation accuracy is at chance, or None."""
    for index, accuracy in enumerate(history.get("val_accuracy", [])):
        if threshold and accuracy is not None and accuracy <= threshold:
            return index + 1
    return None


def _machine():
    import keras
    import tensorflow as tf

    cpu, cpu_flags = results_io.cpu_info()
    return {
        "cpu": cpu + (" (avx512f)" if "avx512f" in cpu_flags else ""),
        "cpus": os.cpu_count(),
        "threads": FLAGS.threads,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


# --- Summary -------------------------------------------------------------------

SHOWN = (
    "loss",
    "adv_ce",
    "local_compactness",
    "local_smoothness",
    "global_compactness",
    "global_smoothness",
    "conditional_entropy",
    "latent_norm",
    "logits_norm",
    "val_accuracy",
    "val_adv_accuracy",
)


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.2e}"


def _series(result, key):
    return [v for v in result["history"].get(key, []) if v is not None]


def markdown(results, all_runs):
    lines = [
        "# Stability study",
        "",
        "Fashion-MNIST, small CNN, L-inf epsilon 0.1, PGD-5 training (step 0.05), Adam 1e-3 "
        "with x0.1 decay at 50%/75% of training, batch 128, seed 0; the last 2,000 training "
        "images are the validation split (clean and PGD-5 accuracy per epoch). "
        "Produced by `python benchmarks/stability.py` (see its docstring). No test image "
        "is used.",
        "",
    ]
    if results:
        r = results[0]
        lines += [
            f"- {r['train_examples']} training images, {r['steps_per_epoch']} steps per "
            f"epoch, {r['epochs_planned']} epochs "
            f"({r['epochs_planned'] * r['steps_per_epoch']} steps) per run.",
            f"- Machine: {r['machine']['cpu']}, {r['machine']['cpus']} CPUs; TensorFlow "
            f"{r['machine']['tensorflow']}, Keras {r['machine']['keras']}.",
            "",
        ]
    by_name = {r["name"]: r for r in results}
    for group, title in (("main", "Formulations"), ("ablation", "Ablation (paper formulation)")):
        lines += [
            f"## {title}",
            "",
            "First → last epoch (max over epochs in brackets for the norms); "
            "validation accuracies in %, last epoch (best epoch in brackets).",
            "",
        ]
        table = []
        for run in all_runs:
            if run.group != group:
                continue
            r = by_name.get(run.name)
            if r is None:
                table.append([run.label, "(pending)"] + [""] * 7)
                continue
            cell = lambda key, peak=False, r=r: (
                "-"
                if not _series(r, key)
                else f"{_fmt(_series(r, key)[0])} → {_fmt(_series(r, key)[-1])}"
                + (f" [{_fmt(max(_series(r, key)))}]" if peak else "")
            )
            acc = lambda key, r=r: (
                "-"
                if not _series(r, key)
                else f"{100 * _series(r, key)[-1]:.1f} ({100 * max(_series(r, key)):.1f})"
            )
            epochs = str(r["epochs_run"])
            if r.get("collapsed_at_epoch"):
                epochs += f" (collapsed at {r['collapsed_at_epoch']}, stopped)"
            table.append(
                [
                    run.label,
                    epochs,
                    cell("loss"),
                    cell("latent_norm", True),
                    cell("logits_norm", True),
                    cell("global_smoothness"),
                    cell("local_compactness"),
                    acc("val_accuracy"),
                    acc("val_adv_accuracy"),
                ]
            )
        lines += results_io.markdown_table(
            [
                "run",
                "epochs",
                "loss",
                "latent_norm",
                "logits_norm",
                "global_smoothness",
                "local_compactness",
                "val clean",
                "val PGD-5",
            ],
            table,
            align="lrlllllrr",
        )
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    from matplotlib.figure import Figure

    main = [r for r in results if r["group"] == "main"]
    if not main:
        return
    figure = Figure(figsize=(15, 10), dpi=100)
    axes = figure.subplots(3, 4).ravel()
    for ax, key in zip(axes, SHOWN):
        for r in main:
            values = r["history"].get(key)
            if not values:
                continue
            steps = [(i + 1) * r["steps_per_epoch"] for i in range(len(values))]
            ax.plot(steps, values, marker=".", label=r["name"])
        ax.set_title(key, fontsize="small")
        if key in ("loss", "global_smoothness", "global_compactness"):
            ax.set_yscale("symlog", linthresh=1.0)  # the paper's run away below 0
        elif key in ("latent_norm", "logits_norm", "local_compactness"):
            ax.set_yscale("log")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
    axes[-1].axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize="small")
    figure.suptitle("ADR stability: per-epoch values vs training step (Fashion-MNIST, small CNN)")
    figure.tight_layout()
    figure.savefig(path)


def write_summary(all_runs, rows_dir):
    _, _, epochs = _plan()
    results = []
    for run in all_runs:
        r = results_io.read_json(os.path.join(rows_dir, f"{run.name}.json"))
        if r and r.get("fingerprint") == fingerprint(run, epochs):
            results.append(r)
    base = os.path.join(FLAGS.results_dir, "stability")
    results_io.write_json_atomic(
        f"{base}.json", {"runs_expected": [run.name for run in all_runs], "runs": results}
    )
    results_io.write_text(f"{base}.md", markdown(results, all_runs))
    plot(results, f"{base}.png")
    return results


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    all_runs = runs()
    if FLAGS.runs:
        unknown = set(FLAGS.runs) - {run.name for run in all_runs}
        if unknown:
            raise app.UsageError(
                f"Unknown runs {sorted(unknown)}; runs: {[run.name for run in all_runs]}"
            )
    by_name = {run.name: run for run in all_runs}
    selected = [by_name[name] for name in FLAGS.runs] if FLAGS.runs else all_runs
    selected = [run for run in selected if not FLAGS.group or run.group == FLAGS.group]
    rows_dir = os.path.join(FLAGS.results_dir, "stability_rows")
    os.makedirs(rows_dir, exist_ok=True)
    _, _, epochs = _plan()
    done = lambda run: (
        (results_io.read_json(os.path.join(rows_dir, f"{run.name}.json")) or {}).get("fingerprint")
        == fingerprint(run, epochs)
    )
    if FLAGS.list:
        for run in all_runs:
            print(f"{run.name:40s} {run.group:9s} {'done' if done(run) else 'pending'}")
        return
    if not FLAGS.report_only:
        for run in selected:
            if done(run):
                continue
            logging.info("stability run %s", run.name)
            train_run(run, os.path.join(rows_dir, f"{run.name}.json"))
            write_summary(all_runs, rows_dir)
    write_summary(all_runs, rows_dir)


if __name__ == "__main__":
    app.run(main)
