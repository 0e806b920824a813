"""An end-to-end run: data, model, ADR training with Keras callbacks, evaluation, export.

`adr-train` is a thin flag parser over `run`. Everything uses Keras' own
machinery: `fit` with its progress bar, `BackupAndRestore` (a killed run
started again with the same output directory resumes from its last finished
epoch), `ModelCheckpoint` of the best robust validation accuracy (whose
weights are evaluated and exported by default), both in keras-adr's atomic
form (a kill while saving leaves the previous file), `TensorBoard`, `CSVLogger`,
and keras-adr's `DivergenceGuard` (a runaway or non-finite loss stops the run
with `TrainingDivergedError`).

Distributed runs (`TrainOptions.strategy`): the model and optimizer are built
inside `strategy.scope()` and the data are batched with the *global* batch
size, sharded by example (`AutoShardPolicy.DATA`). With `multi_worker`, every
worker runs the whole program (training, evaluation, saves: a save may need
collectives, so no worker may skip one), but only the chief writes to
`output_dir`; the others write into a private `workertemp_<index>`
subdirectory that they delete at the end. Each worker also leaves its final
weights in `<output_dir>/worker_<index>.weights.h5`, so that one can check
that the workers finished in sync.
"""

import csv
import dataclasses
import math
import os
import shutil
import time

import keras
import tensorflow as tf
from absl import logging

from keras_adr import callbacks as adr_callbacks
from keras_adr import data, distribute, evaluation, export, fileio, models, precision, rundir
from keras_adr.config import EVAL_ATTACKS, ADRConfig
from keras_adr.recipe import RECIPE
from keras_adr.training import ADRModel

OPTIMIZERS = ("sgd", "adam")
EXPORT_WEIGHTS = ("best", "final")


class TrainingDivergedError(RuntimeError):
    """The loss became non-finite or ran away and `DivergenceGuard` stopped training."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Everything about a run that is not an ADR hyperparameter.

    The training defaults are those of `keras_adr.recipe.RECIPE`.

    Attributes:
        dataset: A name of `keras_adr.data.DATASETS`.
        model: A name of `keras_adr.models.ARCHITECTURES`.
        defense: The preset name the `ADRConfig` came from (recorded only).
        epochs: Training epochs.
        batch_size: Global batch size.
        optimizer: `"sgd"` (momentum 0.9, Nesterov off) or `"adam"`.
        learning_rate: Initial learning rate.
        lr_decay_fractions: Fractions of training after which the learning
            rate is multiplied by 0.1 (piecewise constant schedule).
        weight_decay: Decoupled weight decay of the optimizer (0 = off).
        ema_momentum: Momentum of the optimizer's exponential moving average
            of the weights (Keras' `use_ema`; 0 = off, e.g. 0.999). When on,
            validation, the checkpoint `best.keras`, the final weights, the
            evaluation and the export all use the averaged weights, and the
            backup of an interrupted run keeps the average.
        seed: Random seed for weights, shuffling and attacks.
        train_examples: Use only the first N training examples (None = all).
        validation_examples: Held out from the end of the training split to
            select the best checkpoint by robust accuracy (0 = no validation).
        validation_epsilon: Epsilon of the validation attack that selects the
            checkpoint (None: the training attack's). Its step size is the
            training attack's, scaled by the ratio of the epsilons.
        test_examples: Evaluate on the first N test examples (None = all).
        eval_attacks: Attacks of the final evaluation (see
            `keras_adr.evaluation`; at least one PGD and one APGD attack);
            robust accuracy is their per-example worst case.
        output_dir: Where logs, checkpoints, metrics and the export go.
        data_dir: Optional dataset directory (IDX files or TFDS data_dir).
        strategy: A name of `keras_adr.distribute.STRATEGIES`.
        sync_batchnorm: Synchronized BatchNorm for the ResNets.
        export: Export a SavedModel at the end.
        export_weights: `"best"`: the final evaluation and the export use the
            checkpoint of the best robust validation accuracy (`best.keras`);
            `"final"`: the weights of the last epoch.
        divergence_factor: `DivergenceGuard` stops the run when the epoch
            loss's magnitude exceeds this multiple of its running minimum
            (0 = only non-finite losses stop it).
        precision: The Keras dtype policy of training, one of
            `keras_adr.precision.PRECISIONS` (`"auto"`: bfloat16 on CPUs
            with AMX and on GPUs of compute capability 8.0 and newer, see
            `keras_adr.precision.resolve`). The final
            evaluation and the exported SavedModel compute in float32
            whatever the training precision.
        compilations: How many times to compile the training step at the
            start of training, keeping the one whose steps ran fastest
            (`keras_adr.callbacks.FastestCompilation`; it only changes
            speed; 1 = compile once). A guard against slow compilations;
            the one kind measured is avoided anyway (`pgd(unroll=True)`).
            More than 1 needs a single worker.
        deterministic: Run TensorFlow's ops deterministically
            (`tf.config.experimental.enable_op_determinism`): the same
            command gives the same weights, and a run killed and resumed
            ends with the weights of an uninterrupted one. Slower on some
            ops; off by default.
        verbose: Keras verbosity for `fit` (0, 1 or 2).
        command: The command line, recorded in the outputs.
    """

    dataset: str = RECIPE.dataset
    model: str = RECIPE.model
    defense: str = "adr_pgd"
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    optimizer: str = RECIPE.optimizer
    learning_rate: float = RECIPE.learning_rate
    lr_decay_fractions: tuple = RECIPE.lr_decay_fractions
    weight_decay: float = RECIPE.weight_decay
    ema_momentum: float = 0.0
    seed: int = RECIPE.seed
    train_examples: int = None
    validation_examples: int = RECIPE.validation_examples
    validation_epsilon: float = None
    test_examples: int = None
    eval_attacks: tuple = EVAL_ATTACKS
    output_dir: str = "runs/default"
    data_dir: str = None
    strategy: str = "auto"
    sync_batchnorm: bool = False
    export: bool = True
    export_weights: str = "best"
    divergence_factor: float = adr_callbacks.DEFAULT_DIVERGENCE_FACTOR
    # float32 until bfloat16 training is shown to keep robustness (issue 14).
    precision: str = "float32"
    compilations: int = 1
    deterministic: bool = False
    verbose: int = 1
    command: str = ""

    def __post_init__(self):
        if self.dataset not in data.DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; valid: {', '.join(data.DATASETS)}."
            )
        if self.model not in models.ARCHITECTURES:
            raise ValueError(
                f"Unknown model {self.model!r}; valid: {', '.join(models.ARCHITECTURES)}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; valid: {OPTIMIZERS}.")
        if self.precision not in precision.PRECISIONS:
            raise ValueError(
                f"Unknown precision {self.precision!r}; valid: {', '.join(precision.PRECISIONS)}."
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; got {self.learning_rate}.")
        if any(not 0 < f < 1 for f in self.lr_decay_fractions) or list(
            self.lr_decay_fractions
        ) != sorted(self.lr_decay_fractions):
            raise ValueError(
                "`lr_decay_fractions` must be increasing fractions in (0, 1); got "
                f"{self.lr_decay_fractions}."
            )
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None; got {value}.")
        if self.export_weights not in EXPORT_WEIGHTS:
            raise ValueError(
                f"`export_weights` must be one of {EXPORT_WEIGHTS}; got {self.export_weights!r}."
            )
        if not (self.divergence_factor == 0 or self.divergence_factor > 1):
            raise ValueError(
                f"`divergence_factor` must be 0 (off) or > 1; got {self.divergence_factor}."
            )
        evaluation.parse_suite(self.eval_attacks)  # fail before training, not after
        self._check_run_numbers()

    def _check_run_numbers(self):
        if not isinstance(self.compilations, int) or self.compilations < 1:
            raise ValueError(
                "`compilations` (--compilations) must be an integer >= 1; got "
                f"{self.compilations!r}."
            )
        if self.validation_examples < 0:
            raise ValueError(f"`validation_examples` must be >= 0; got {self.validation_examples}.")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(
                f"`ema_momentum` (--ema_momentum) must be in [0, 1) (0 = off, e.g. 0.999); got "
                f"{self.ema_momentum}."
            )
        if self.validation_epsilon is not None and not self.validation_epsilon > 0:
            raise ValueError(
                f"`validation_epsilon` must be > 0 or None; got {self.validation_epsilon}."
            )


def build_model(options, adr_config, dataset_info, train_split=None):
    """The ADRModel of `options.model` for the dataset's input shape and classes.

    A `Standardize` layer in the architecture is adapted to the per-channel
    statistics of `train_split` (un-augmented).
    """
    kwargs = dict(input_shape=dataset_info.input_shape, num_classes=dataset_info.num_classes)
    if options.model in ("resnet18", "wide_resnet"):
        kwargs["sync_batchnorm"] = options.sync_batchnorm
    backbone = models.get(options.model, **kwargs)
    names = {layer.name for layer in backbone.layers}
    if train_split is not None and models.STANDARDIZE_LAYER in names:
        backbone.get_layer(models.STANDARDIZE_LAYER).adapt(
            data.load(options.dataset, train_split, batch_size=1000, data_dir=options.data_dir)
        )
    return ADRModel(backbone, adr_config)


def build_optimizer(options, steps_per_epoch):
    """`options.optimizer` with the piecewise-constant schedule of `options`."""
    total_steps = options.epochs * steps_per_epoch
    boundaries = [max(1, int(f * total_steps)) for f in options.lr_decay_fractions]
    values = [options.learning_rate * 0.1**i for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    common = dict(weight_decay=options.weight_decay or None)
    if options.ema_momentum:
        common.update(use_ema=True, ema_momentum=options.ema_momentum)
    if options.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, **common)
    return keras.optimizers.Adam(schedule, **common)


def _splits(options, dataset_info):
    """Training and validation split strings: validation = the last examples of train."""
    train_size = options.train_examples or dataset_info.num_train
    if train_size > dataset_info.num_train:
        logging.warning(
            "--train_examples=%d is more than the %d training examples of %s; using all %d.",
            train_size,
            dataset_info.num_train,
            options.dataset,
            dataset_info.num_train,
        )
        train_size = dataset_info.num_train
    held_out = options.validation_examples
    if held_out >= train_size:
        raise ValueError(
            f"`validation_examples` ({held_out}) must be smaller than the "
            f"training examples ({train_size})."
        )
    train_split = f"train[:{train_size - held_out}]"
    validation_split = f"train[{train_size - held_out}:{train_size}]" if held_out else None
    return train_split, validation_split, train_size - held_out


def _guard(options, history_path):
    # A factor of 0 keeps only the non-finite check (an infinite factor).
    history = read_history(history_path)
    logged = {
        epoch: {k: v[i] for k, v in history.items() if k != "epoch"}
        for i, epoch in enumerate(history.get("epoch", []))
    }
    return adr_callbacks.DivergenceGuard(
        factor=options.divergence_factor or math.inf, logged_epochs=logged
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


def _callbacks(out, monitor, guard, fastest, ema):
    history_path = os.path.join(out, "history.csv")
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
            initial_value_threshold=_best_logged(history_path, monitor),
            save_averaged_weights=ema,
        ),
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")),
        # Last: an epoch counts as done only once logged and checkpointed, so
        # a kill before its backup reruns it (`read_history` keeps the rerun's
        # row) instead of leaving it out of `history.csv`. Kept until the run
        # records its training as finished: a kill between the end of `fit`
        # and that record resumes at the end, not epoch 1.
        adr_callbacks.AtomicBackupAndRestore(os.path.join(out, "backup"), delete_checkpoint=False),
    ]


def _best_logged(history_path, monitor):
    """Best `monitor` value of the epochs already logged by an interrupted run.

    A resumed run's `ModelCheckpoint` starts from it, so that `best.keras`
    is not replaced by a worse epoch after a restart.
    """
    values = read_history(history_path).get(monitor, [])
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def _check_finite(history):
    for name, values in history.items():
        for epoch, value in enumerate(values):
            if value is not None and not math.isfinite(value):
                raise TrainingDivergedError(
                    f"Training diverged: `{name}` became {value} in epoch {epoch + 1}; "
                    "the run was stopped. Lower --learning_rate, or check the ADR weights "
                    "and the data."
                )


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
    history = read_history(os.path.join(out, "history.csv"))
    values = [-math.inf if v is None else v for v in history.get(monitor, [])]
    if not values:
        return None
    return history["epoch"][values.index(max(values))] + 1


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


def read_history(path):
    """`{column: [values per epoch]}` of `history.csv`, one row per epoch
    (`"epoch"`: the 0-based epoch numbers; missing values are None).

    A row logged twice (an epoch rerun after a kill between its log line and
    its backup) keeps the last value, the one of the weights that went on.
    """
    if not os.path.exists(path):
        return {}
    by_epoch = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_epoch[int(row["epoch"])] = row
    history = {"epoch": sorted(by_epoch)}
    for epoch in sorted(by_epoch):
        for key, value in by_epoch[epoch].items():
            if key != "epoch":
                # CSVLogger writes "NA" for a value an epoch did not log.
                history.setdefault(key, []).append(
                    None if value in ("", "NA", None) else float(value)
                )
    return history


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
    if options.precision == "auto":
        policy, why = precision.auto_choice()
        why = f"--precision=auto: {why}"
    else:
        policy, why = precision.resolve(options.precision), f"--precision={options.precision}"
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
    train_split, validation_split, num_train = _splits(options, info)

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
    _check_splits(options, info, train_split, evaluate=not run_dir.state.get("evaluation"))
    steps_per_epoch = math.ceil(num_train / options.batch_size)

    with strategy.scope():
        model = build_model(options, adr_config, info, train_split)
        model.validation_epsilon = options.validation_epsilon
        model.compile(optimizer=build_optimizer(options, steps_per_epoch))
    distribute.patch_keras_fit(model)

    monitor = _checkpoint_monitor(validation_ds is not None, adr_config.uses_adversary)
    if not run_dir.state.get("trained"):
        _train(model, options, strategy, run_dir, (train_ds, epoch), validation_ds, monitor)
    else:
        model.set_weights(keras.saving.load_model(run_dir.file("final.keras")).get_weights())
    history = read_history(run_dir.file("history.csv"))
    _check_finite(history)
    best_epoch = _select_weights(model, options, run_dir.path, monitor)

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
    guard = _guard(options, run_dir.file("history.csv"))
    fastest = adr_callbacks.FastestCompilation(_compilations(options, strategy))
    # The dataset shuffles itself (seeded, every epoch); Keras' own shuffle
    # does not apply to a tf.data.Dataset and would only warn.
    model.fit(
        train_ds,
        epochs=options.epochs,
        validation_data=validation_ds,
        callbacks=[
            adr_callbacks.EpochVariable(epoch),
            *_callbacks(run_dir.path, monitor, guard, fastest, bool(options.ema_momentum)),
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


def _check_splits(options, info, train_split, evaluate):
    """Fails before training if a split the run uses is missing or of another image shape.

    Reads the first example of the training split and, if the evaluation is
    still to run, of the test split (un-augmented: augmentation may leave
    shapes unknown).

    Raises:
        keras_adr.data.DatasetNotFoundError: If a split is missing.
        ValueError: If a split's images do not have the dataset's shape.
    """
    expected = tuple(info.input_shape)
    for split in (train_split, "test") if evaluate else (train_split,):
        first = data.load(options.dataset, split, batch_size=1, data_dir=options.data_dir, take=1)
        shape = tuple(first.element_spec[0].shape[1:])
        if shape != expected:
            raise ValueError(
                f"The {split.split('[')[0]} images of {options.dataset!r} have shape {shape}, "
                f"but {options.dataset} images are {expected}: give a --data_dir whose train "
                "and test files both hold them."
            )


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


def format_summary(metrics):
    """A few readable lines about a finished run."""
    evaluation_results = metrics["evaluation"]
    lines = [
        f"dataset={metrics['dataset']} train_examples={metrics['train_examples']} "
        f"epochs={metrics['epochs_run']} train={metrics['train_seconds']:.0f}s "
        f"eval={metrics['eval_seconds']:.0f}s",
        f"clean accuracy:  {metrics['clean_accuracy']:.2%}",
    ]
    # Runs from before the cascade attacked every example with every attack.
    after = not evaluation_results.get("standalone_attacks", True)
    for name, accuracy in evaluation_results.get("attack_accuracy", {}).items():
        label = f"after {name}:" if after else f"{name} accuracy:"
        lines.append(f"{label:17s}{accuracy:.2%}")
    lines.append(
        f"robust accuracy: {metrics['robust_accuracy']:.2%} (worst case per example "
        "over the attacks above)"
    )
    if "export_path" in metrics:
        lines.append(f"exported to {metrics['export_path']}")
    return "\n".join(lines)
