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

This module is the program (flags, running a row, main); the presets, rows and
fingerprints are in `robustness_presets.py`, the statistics over rows in
`robustness_stats.py`, and the summary files in `robustness_report.py`.
"""

import dataclasses
import datetime
import gc
import os
import shutil
import sys
import time

from absl import app, flags, logging

if not __package__:  # `python benchmarks/robustness.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import results_io  # noqa: E402
from benchmarks.robustness_presets import (  # noqa: E402
    BASE_PRECISION,
    PRESETS,
    adr_config,
    eval_options,
    fingerprint,
    rows_of,
)
from benchmarks.robustness_report import write_summary  # noqa: E402
from benchmarks.robustness_stats import bits  # noqa: E402
from keras_adr import config as config_lib  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Benchmark preset.")
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
flags.DEFINE_bool(
    "train_only",
    False,
    "Train the selected rows and stop before evaluating them (a later run without the "
    "flag reuses the finished trainings).",
)
# Overrides of the preset, for smoke tests; they change the fingerprint, so
# use them with another --results_dir.
flags.DEFINE_integer("train_examples", None, "Override the preset's training subset.")
flags.DEFINE_integer("epochs", None, "Override the preset's epochs.")
flags.DEFINE_integer("validation_examples", None, "Override the preset's validation examples.")
flags.DEFINE_integer("test_examples", None, "Override the preset's test examples.")
flags.DEFINE_integer("restarts", None, "Override the preset's evaluation restarts.")
flags.DEFINE_list("eval_attacks", None, "Override the preset's evaluation attacks.")

# Examples of the cheap evaluation `pipeline.run` does itself (of the final
# model; recorded as a cross-check of the loaded checkpoint).
PIPELINE_CHECK_EXAMPLES = 128
PIPELINE_CHECK_ATTACKS = ("pgd20", "apgd_ce")


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
        or config_lib.without_speed_fields(r.get("adr_config", {})) != config.result_config()
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
        ema_momentum=row.ema_momentum,
        seed=row.seed,
        train_examples=preset.train_examples,
        validation_examples=preset.validation_examples,
        # Only where it differs from the training epsilon: runs that validated
        # at their training epsilon keep their run configuration.
        validation_epsilon=(
            preset.validation_epsilon
            if preset.validation_epsilon not in (None, config.attack.epsilon)
            else None
        ),
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

    if FLAGS.train_only:
        return None
    if not from_stability:
        checkpoint = os.path.join(output_dir, "best.keras")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"{row.name}: pipeline.run left no {checkpoint}.")
    test = data.load(
        preset.dataset, "test", batch_size=256, data_dir=FLAGS.data_dir, take=preset.test_examples
    )
    eval_started = time.time()
    result = evaluation.evaluate_robustness(
        checkpoint, test, **eval_options(preset, config.attack.norm)
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
        "ema_momentum": row.ema_momentum,
        "validation_epsilon": preset.validation_epsilon or config.attack.epsilon,
        "standalone_attacks": preset.standalone_attacks,
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
        "clean_correct_bits": bits(result.clean_correct),
        "robust_correct_bits": bits(result.robust_correct),
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
            if r is None:
                logging.info("[%d/%d] %s: trained", index + 1, len(selected), row.name)
                continue
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
            write_summary(FLAGS.preset, preset, rows, rows_dir, FLAGS.results_dir)
    results = write_summary(FLAGS.preset, preset, rows, rows_dir, FLAGS.results_dir)
    logging.info(
        "%d/%d rows finished; summary in %s.{json,md,png}",
        len(results),
        len(rows),
        os.path.join(FLAGS.results_dir, FLAGS.preset),
    )


if __name__ == "__main__":
    app.run(main)
