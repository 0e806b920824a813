"""An end-to-end run: data, model, ADR training with Keras callbacks, evaluation, export.

`adr-train` is a thin flag parser over `run`. Training is Keras' `fit` with
its callbacks, in keras-adr's atomic forms where they write files:
`BackupAndRestore` (a rerun resumes from the last finished epoch),
`ModelCheckpoint` of the best robust validation accuracy (evaluated and
exported by default), `TensorBoard`, `CSVLogger`, and `DivergenceGuard` (a
runaway or non-finite loss raises `TrainingDivergedError`).

Distributed runs (`TrainOptions.strategy`) build the model and optimizer in
`strategy.scope()` and batch the data with the *global* batch size, sharded
by example. With `multi_worker` every worker runs the whole program (a save
may need collectives), but only the chief writes to `output_dir`; the others
write into a private `workertemp_<index>` that they delete at the end, and
each worker leaves its final weights in `worker_<index>.weights.h5`.
"""

import dataclasses
import math
import os
import shutil
import time

import keras
import tensorflow as tf
from absl import logging

from keras_adr import _run_history as run_history
from keras_adr import _run_inputs as run_inputs
from keras_adr import callbacks as adr_callbacks
from keras_adr import data, distribute, evaluation, export, fileio, precision, rundir
from keras_adr._run_history import TrainingDivergedError, read_history  # noqa: F401
from keras_adr._run_inputs import build_model, build_optimizer  # noqa: F401
from keras_adr.config import ADRConfig

# Re-exported: `pipeline.<name>` as before these moved to their own modules.
from keras_adr.recipe import EXPORT_WEIGHTS, OPTIMIZERS, TrainOptions  # noqa: F401


def _guard(options, history_path):
    # A factor of 0 keeps only the non-finite check (an infinite factor).
    return adr_callbacks.DivergenceGuard(
        factor=options.divergence_factor or math.inf,
        logged_epochs=run_history.logged_epochs(history_path),
    )


def _checkpoint_monitor(has_validation, uses_adversary):
    # Robust accuracy when there is one to monitor: `standard` training logs
    # no adversarial accuracy, its validation step does.
    if has_validation:
        return "val_adv_accuracy"
    return "adv_accuracy" if uses_adversary else "accuracy"


def _compilations(options, strategy):
    """How many compilations of the training step `FastestCompilation` times."""
    workers = distribute.num_workers(strategy)
    if options.compilations > 1 and workers > 1:
        raise ValueError(
            f"--compilations={options.compilations} needs a single worker (each worker would "
            f"keep its own compilation); this run has {workers}. Use --compilations=1."
        )
    return options.compilations


def _callbacks(out, monitor, guard, fastest, ema, chief_dir):
    """`fit`'s callbacks. Every worker reads the chief's history and backup (in
    `chief_dir`), so all resume at one epoch and save alike (saves may need collectives)."""
    history_path = os.path.join(out, "history.csv")
    chief_history = os.path.join(chief_dir, "history.csv")
    return [
        fastest,
        adr_callbacks.EpochSeconds(),
        guard,
        # Validation measures the averaged weights, and best.keras keeps them.
        *([keras.callbacks.SwapEMAWeights()] if ema else []),
        adr_callbacks.AtomicModelCheckpoint(
            os.path.join(out, "best.keras"),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            initial_value_threshold=run_history.best_logged(chief_history, monitor),
            save_averaged_weights=ema,
        ),
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")),
        # Last: an epoch counts as done only once logged and checkpointed, so
        # a kill before its backup reruns it (`read_history` keeps the rerun's
        # row) instead of leaving it out of `history.csv`. Kept until the run
        # records its training as finished: a kill between the end of `fit`
        # and that record resumes at the end, not epoch 1.
        adr_callbacks.AtomicBackupAndRestore(
            os.path.join(out, "backup"),
            delete_checkpoint=False,
            restore_from=os.path.join(chief_dir, "backup"),
        ),
    ]


def _select_weights(model, options, out, monitor):
    """Loads `best.keras` into `model` for `export_weights="best"`; returns its epoch.

    The epoch (1-based) is the one of the best monitored value in
    `history.csv`, which spans resumed runs; `None` for the final weights.
    """
    if options.export_weights == "final":
        return None
    path = os.path.join(out, "best.keras")
    if not os.path.exists(path):
        raise ValueError(
            f"--export_weights=best, but training saved no {path}; use --export_weights=final."
        )
    best = keras.saving.load_model(path)
    model.set_weights(best.get_weights())
    del best
    return run_history.best_epoch(os.path.join(out, "history.csv"), monitor)


def _run_config(options, adr_config, policy="float32"):
    """What defines a run: every option but the display ones, and the ADRConfig.

    The precision is the resolved policy (`"auto"` may mean another one on
    another machine), left out when float32: runs from before `--precision`
    computed in float32 and recorded none, and their directories still resume.
    """
    # `compilations` changes only the speed.
    skipped = ("verbose", "command", "output_dir", "precision", "compilations")
    stored = {k: v for k, v in dataclasses.asdict(options).items() if k not in skipped}
    # Options added later, at the value every earlier run had: those runs still resume.
    for name, earlier in (
        ("ema_momentum", 0.0),
        ("validation_epsilon", None),
        ("deterministic", False),
    ):
        if stored[name] == earlier:
            del stored[name]
    if policy != "float32":
        stored["precision"] = policy
    # Without the attack's speed-only fields (`unroll`), as for `compilations`.
    return {"options": stored, "adr_config": adr_config.result_config()}


def run(options, adr_config):
    """Trains, evaluates and exports one model; returns the metrics dict.

    The output directory is locked for the run and bound to its
    configuration (`keras_adr.rundir`). Rerun with the same options after an
    interruption, it continues from the last finished stage: the last
    finished training epoch, then evaluation, then export; a finished run is
    not run again.

    Args:
        options: A `TrainOptions`.
        adr_config: The `ADRConfig` (e.g. from `keras_adr.presets.get`).

    Returns:
        The metrics written to `<output_dir>/metrics.json`.

    Raises:
        TrainingDivergedError: If the loss became non-finite or ran away.
        keras_adr.data.DatasetNotFoundError: If the dataset is missing.
        keras_adr.rundir.RunDirectoryError: If the output directory is in
            use, unusable, or holds a run of another configuration.
    """
    if not isinstance(adr_config, ADRConfig):
        raise ValueError(f"`adr_config` must be an ADRConfig; got {type(adr_config).__name__}.")
    # First: MultiWorkerMirroredStrategy must configure collectives before
    # TensorFlow runs anything.
    strategy = distribute.get_strategy(options.strategy)
    if options.deterministic:
        tf.config.experimental.enable_op_determinism()
    out = distribute.work_dir(strategy, options.output_dir)
    policy, why = run_inputs.training_policy(options, strategy, out)
    with rundir.RunDirectory(out, _run_config(options, adr_config, policy)) as run_dir:
        if run_dir.state.get("complete") and os.path.exists(run_dir.file("metrics.json")):
            return fileio.read_json(run_dir.file("metrics.json"))
        logging.info("Training precision: %s (%s).", policy, why)
        precision.log_speed_warnings(policy)
        # The model is built under the policy and keeps it; the global policy
        # is restored afterwards.
        with precision.policy_scope(policy):
            return _run_stages(options, adr_config, strategy, run_dir, policy)


def _run_stages(options, adr_config, strategy, run_dir, policy):
    """Train, select weights, evaluate, export: each stage `run_dir` records as done is skipped."""
    chief = distribute.is_chief(strategy)
    workers = distribute.num_workers(strategy)
    keras.utils.set_random_seed(options.seed)
    info = data.info(options.dataset)
    train_split, validation_split, num_train = run_inputs.splits(options, info)

    # Same seed on every worker: identical global batches, each replica takes its slice.
    load = lambda split, **kw: distribute.shard_by_data(
        data.load(
            options.dataset,
            split,
            batch_size=options.batch_size,
            data_dir=options.data_dir,
            seed=options.seed,
            **kw,
        )
    )
    # Each epoch's order follows its number (set by `EpochVariable`), so a
    # resumed run sees the order of an uninterrupted one.
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    train_ds = load(train_split, shuffle=True, augment=True, epoch=epoch)
    validation_ds = load(validation_split) if validation_split else None
    run_inputs.check_splits(
        options, info, train_split, evaluate=not run_dir.state.get("evaluation")
    )
    steps_per_epoch = math.ceil(num_train / options.batch_size)

    with strategy.scope():
        model = run_inputs.build_model(options, adr_config, info, train_split)
        model.validation_epsilon = options.validation_epsilon
        model.compile(optimizer=build_optimizer(options, steps_per_epoch))
    distribute.patch_keras_fit(model)

    monitor = _checkpoint_monitor(validation_ds is not None, adr_config.uses_adversary)
    if not run_dir.state.get("trained"):
        _train(model, options, strategy, run_dir, (train_ds, epoch), validation_ds, monitor)
    else:
        model.set_weights(keras.saving.load_model(run_dir.file("final.keras")).get_weights())
    history = run_history.read_history(run_dir.file("history.csv"))
    run_history.check_finite(history)
    # Every worker takes the chief's best.keras, once written (a worker lost
    # before its own save has none, or an older one).
    distribute.barrier(strategy)
    best_epoch = _select_weights(model, options, options.output_dir, monitor)

    results, eval_seconds = _evaluate(model, options, adr_config, run_dir)

    metrics = {
        "command": options.command,
        "options": dataclasses.asdict(options),
        "adr_config": adr_config.get_config(),
        "dataset": options.dataset,
        "strategy": type(strategy).__name__,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "num_workers": workers,
        "train_examples": num_train,
        "epochs_run": len(history.get("loss", [])),
        "train_seconds": round(sum(history.get("epoch_seconds", [])), 1),
        "eval_seconds": eval_seconds,
        "history": {k: v for k, v in history.items() if k not in ("epoch", "epoch_seconds")},
        "evaluation": results,
        "clean_accuracy": results["clean_accuracy"],
        "robust_accuracy": results["robust_accuracy"],
        "export_weights": options.export_weights,
        "selected_epoch": best_epoch,
        "precision": _precision_record(options, policy),
        # FastestCompilation's median step seconds per compilation and the one kept.
        "compilations": run_dir.state.get("compilations"),
    }
    if workers > 1:
        metrics["worker_index"] = distribute.worker_index(strategy)
        model.save_weights(
            os.path.join(
                options.output_dir, f"worker_{distribute.worker_index(strategy)}.weights.h5"
            )
        )
    if options.export:
        metrics["export_path"] = run_dir.state.get("export_path") or _export(
            model, options, adr_config, info, results, best_epoch, run_dir, policy
        )
    if chief:
        fileio.write_json(run_dir.file("metrics.json"), metrics)
        run_dir.update(complete=True)
    else:
        metrics.pop("export_path", None)
        distribute.remove_work_dir(strategy, options.output_dir)
    return metrics


def _train(model, options, strategy, run_dir, train, validation_ds, monitor):
    """The training stage: `fit`, then `final.keras` and the run directory's record.

    `train` is the training dataset and the epoch variable its order follows.
    """
    train_ds, epoch = train
    # The chief's history, on every worker (see `_callbacks`).
    guard = _guard(options, os.path.join(options.output_dir, "history.csv"))
    fastest = adr_callbacks.FastestCompilation(_compilations(options, strategy))
    # The dataset shuffles itself (seeded, every epoch); Keras' own shuffle
    # does not apply to a tf.data.Dataset and would only warn.
    model.fit(
        train_ds,
        epochs=options.epochs,
        validation_data=validation_ds,
        callbacks=[
            adr_callbacks.EpochVariable(epoch),
            *_callbacks(
                run_dir.path,
                monitor,
                guard,
                fastest,
                bool(options.ema_momentum),
                options.output_dir,
            ),
        ],
        verbose=options.verbose,
        shuffle=False,
    )
    if guard.diverged:
        raise TrainingDivergedError(
            f"{guard.reason} Lower --learning_rate, use a bounded ADR preset (adr_pgd, "
            f"adr_trades) rather than the paper's, or raise --divergence_factor. The best "
            f"robust checkpoint so far is {run_dir.file('best.keras')}."
        )
    if fastest.step_seconds:
        run_dir.update(compilations={"step_seconds": fastest.step_seconds, "kept": fastest.kept})
    # With EMA, `fit` has left the averaged weights in the model (Keras'
    # `finalize_variable_values`): final.keras is the averaged model.
    # Every worker saves (collectives); a non-chief one into its private directory.
    model.save(run_dir.file("final.keras"))
    run_dir.update(trained=True)
    shutil.rmtree(run_dir.file("backup"), ignore_errors=True)


def _evaluate(model, options, adr_config, run_dir):
    """The evaluation stage's `(results, seconds)`, from the run directory if it ran."""
    if run_dir.state.get("evaluation"):
        return run_dir.state["evaluation"], run_dir.state["eval_seconds"]
    # Evaluation is local (no collectives): every worker runs it on the same data.
    test_ds = data.load(
        options.dataset,
        "test",
        batch_size=256,
        data_dir=options.data_dir,
        take=options.test_examples,
    )
    started = time.time()
    results = evaluation.evaluate_robustness(
        # Float32 whatever the training precision (the same weights).
        precision.with_policy(model.backbone, "float32"),
        test_ds,
        epsilon=adr_config.attack.epsilon,
        norm=adr_config.attack.norm,
        attacks=options.eval_attacks,
        seed=options.seed,
    ).to_dict()
    eval_seconds = round(time.time() - started, 1)
    run_dir.update(evaluation=results, eval_seconds=eval_seconds)
    return results, eval_seconds


def _precision_record(options, policy):
    """What metrics.json and the export metadata record about precision."""
    return {
        "requested": options.precision,
        "training": policy,
        "evaluation": "float32",
        "export": "float32",
    }


def _export(model, options, adr_config, info, results, best_epoch, run_dir, policy):
    """Exports once per run: a version this run already published is reused.

    The SavedModel computes in float32 (a float32 copy of the weights): the
    served model is the one the final evaluation measured.
    """
    base = run_dir.file("saved_model")
    run_id = run_dir.config_id
    for version in export.list_versions(base) if os.path.isdir(base) else []:
        path = os.path.join(base, str(version))
        try:
            if export.read_metadata(path).get("run_id") == run_id:
                run_dir.update(export_path=path)
                return path
        except (OSError, ValueError):
            continue
    metadata = {
        "run_id": run_id,
        "dataset": options.dataset,
        "class_names": list(info.class_names),
        "defense": options.defense,
        "adr_config": adr_config.get_config(),
        "weights": {
            "selected": options.export_weights,
            "epoch": best_epoch,
            "ema_momentum": options.ema_momentum,
        },
        "attack_budget": {"norm": adr_config.attack.norm, "epsilon": adr_config.attack.epsilon},
        "robustness": results,
        "precision": _precision_record(options, policy),
        "command": options.command,
    }
    path = export.export_saved_model(
        precision.with_policy(model.backbone, "float32"), base, metadata=metadata
    )
    run_dir.update(export_path=path)
    return path
