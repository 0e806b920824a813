"""Keras callbacks for robust training runs.

`RobustAccuracy` logs the worst-case accuracy under an attack suite on
held-out data, for `ModelCheckpoint`, `EarlyStopping` and TensorBoard.
`DivergenceGuard` stops a run whose objective has run away. `TerminateOnNaN`
alone lets a run end as a collapsed model (the paper's ADR objective falls
without bound for epochs before anything becomes NaN), and `fit` returns
normally either way; the guard restores the last healthy weights and says
which term grew most, so a program can exit non-zero with that message.

`FastestCompilation` compiles the training step more than once at the start
of `fit` and keeps the compilation whose steps ran fastest: a compiled step
can land on a slow path for as long as it is used (issue 14).

`AtomicBackupAndRestore` and `AtomicModelCheckpoint` are Keras' own callbacks
whose files are replaced in one rename: Keras writes them in place, so a
process killed while saving leaves a truncated HDF5 file that the next run
cannot open (`OSError: bad object header version number`).
"""

import contextlib
import json
import math
import os
import shutil
import statistics
import time

import keras
import numpy as np
from absl import logging

from keras_adr import _keras_compat, distribute, fileio, specs

# A healthy run's epoch loss does not triple; the paper's ADR objective, when it
# runs away, passes 3x its minimum magnitude within one epoch (2.32 -> -8.43 in
# benchmarks/results/stability.md, where the model collapsed to chance).
DEFAULT_DIVERGENCE_FACTOR = 3.0
# Losses closer to 0 than this are compared with it instead: a near-zero
# minimum would make ordinary noise look like a blow-up.
DEFAULT_LOSS_FLOOR = 0.1
# FastestCompilation: a slow compiled step is slow on every step, so a few
# timed steps tell (docs/mixed-precision.md, "Slow compilations").
DEFAULT_COMPILATIONS = 2
DEFAULT_TIMED_STEPS = 8
DEFAULT_WARMUP_STEPS = 2


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to the logs as `epoch_seconds`.

    Put it before `CSVLogger`: the times then live in the history file, so
    the training time of a resumed run can be summed over all its epochs.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.time() - self._started


class EpochVariable(keras.callbacks.Callback):
    """Sets a variable to the epoch number at the start of every epoch.

    `keras_adr.data.load(..., shuffle=True, epoch=variable)` draws each
    epoch's order from it, so the order depends on the epoch's number, not
    on how many epochs this process has run: a run resumed by
    `BackupAndRestore` at epoch N shuffles as an uninterrupted one did.

    Args:
        variable: A scalar int64 `tf.Variable`, created outside any
            distribution strategy's scope.
    """

    def __init__(self, variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


class RobustAccuracy(keras.callbacks.Callback):
    """Logs the worst-case accuracy over an attack suite every `every` epochs.

    At the end of every `every`-th epoch the model (in inference mode) is
    attacked on `data` with `keras_adr.evaluation.evaluate_robustness`, and
    `logs[name]` gets the per-example worst case over `attacks` (and
    `logs[name + "_clean"]` the clean accuracy), so the value lands in the
    `History` and in the callbacks that read it (`ModelCheckpoint(monitor=
    name)`, `EarlyStopping`, `CSVLogger`, `TensorBoard`). Put it before
    them in the `callbacks` list: Keras calls them in order. A progress bar
    (`keras.utils.Progbar`) follows the attack's batches.

    Args:
        data: Held-out `(images, labels)`: a `tf.data.Dataset` or arrays.
        epsilon: Radius of the threat model.
        norm: `"linf"` or `"l2"`.
        attacks: The suite (at least one PGD and one APGD attack); default
            `keras_adr.specs.EVAL_ATTACKS`.
        every: Evaluate every this many epochs.
        restarts, apgd_targets, seed, batch_size: See `evaluate_robustness`.
        name: The log key.
        verbose: `"auto"` (that of `fit`), 0 (silent), 1 (progress bar) or
            2 (one line when done).
    """

    def __init__(
        self,
        data,
        *,
        epsilon,
        norm="linf",
        attacks=specs.EVAL_ATTACKS,
        every=1,
        restarts=1,
        apgd_targets=3,
        seed=0,
        batch_size=128,
        name="val_robust_accuracy",
        verbose="auto",
    ):
        super().__init__()
        from keras_adr import evaluation

        evaluation.parse_suite(attacks)  # fail now, not after the first epoch
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1; got {every!r}.")
        if verbose not in ("auto", 0, 1, 2):
            raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2; got {verbose!r}.")
        self.verbose = verbose
        self.data = data
        self.every = every
        self.name = name
        self.options = dict(
            epsilon=epsilon,
            norm=norm,
            attacks=tuple(attacks),
            restarts=restarts,
            apgd_targets=apgd_targets,
            seed=seed,
            batch_size=batch_size,
        )
        self.last_result = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or logs is None:
            return
        from keras_adr import evaluation

        fit_verbose = (self.params or {}).get("verbose", 1)
        verbose = self.verbose if self.verbose != "auto" else fit_verbose
        verbose = 1 if verbose == "auto" else verbose
        attacks, epsilon = ", ".join(self.options["attacks"]), self.options["epsilon"]
        what = f"{self.name} ({attacks}, epsilon {epsilon:g})"
        if verbose == 1:
            # `fit`'s own bar is still mid-line (it ends at the epoch end).
            print(("\n" if fit_verbose in (1, "auto") else "") + what + ":", flush=True)
        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
            bar.update(done)

        result = evaluation.evaluate_robustness(
            self.model, self.data, progress=progress if verbose == 1 else None, **self.options
        )
        if verbose == 2:
            print(f"{what}: {result.robust_accuracy:.4f}", flush=True)
        self.last_result = result
        logs[self.name] = result.robust_accuracy
        logs[f"{self.name}_clean"] = result.clean_accuracy


def _is_term(name):
    # Loss terms only: not validation values, accuracies or the scale
    # diagnostics (`latent_norm`, `logits_norm`).
    return (
        not name.startswith("val_")
        and "accuracy" not in name
        and not name.endswith("_norm")
        and name not in ("loss", "learning_rate", "epoch_seconds")
    )


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training when the loss is not finite or has run away.

    At every batch the running epoch loss must be finite. At every epoch end
    its magnitude must stay within `factor` times the running minimum of the
    magnitudes of earlier epoch ends (at least `loss_floor`). Magnitudes,
    because an objective that is unbounded below runs away towards -inf.
    On a violation the guard sets `model.stop_training`, restores the weights
    of the epoch with the smallest loss magnitude (when
    `restore_best_weights`), and records `diverged` and `reason`; `fit`
    returns normally, so the caller must check `guard.diverged`.

    Args:
        factor: Allowed multiple of the running minimum (> 1).
        loss_floor: Smallest reference magnitude (>= 0).
        restore_best_weights: Restore the weights of the best epoch on stop.
        monitor: The logged loss to watch.
        logged_epochs: For a resumed run, `{epoch: logs}` of the epochs an
            earlier process trained (e.g. from its `CSVLogger` file). Those
            before the epoch `fit` resumes at count as if this guard had
            seen them, so the resumed run stops where an uninterrupted one
            would. Their weights are gone: a stop restores weights only of
            an epoch this process trained.
    """

    def __init__(
        self,
        factor=DEFAULT_DIVERGENCE_FACTOR,
        loss_floor=DEFAULT_LOSS_FLOOR,
        restore_best_weights=True,
        monitor="loss",
        logged_epochs=None,
    ):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ValueError(f"`factor` must be a number > 1; got {factor!r}.")
        if (
            isinstance(loss_floor, bool)
            or not isinstance(loss_floor, (int, float))
            or not (loss_floor >= 0)
        ):
            raise ValueError(f"`loss_floor` must be a number >= 0; got {loss_floor!r}.")
        self.factor = float(factor)
        self.loss_floor = float(loss_floor)
        self.restore_best_weights = restore_best_weights
        self.monitor = monitor
        self.logged_epochs = dict(logged_epochs or {})
        self._reset()

    def _reset(self):
        self.diverged = False
        self.reason = None
        self.best_epoch = None
        self._best_magnitude = math.inf
        self._best_logs = None
        self._best_weights = None
        self._replayed = False

    def on_train_begin(self, logs=None):
        self._reset()

    def on_epoch_begin(self, epoch, logs=None):
        if self._replayed:
            return
        # The first epoch of this `fit`: `BackupAndRestore` has chosen it.
        self._replayed = True
        for logged in sorted(e for e in self.logged_epochs if e < epoch):
            value = self.logged_epochs[logged].get(self.monitor)
            if value is not None and math.isfinite(value) and abs(value) < self._best_magnitude:
                self._remember(logged, self.logged_epochs[logged], weights=False)

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(float(value)):
            bad = sorted(k for k, v in logs.items() if _is_term(k) and not math.isfinite(float(v)))
            self._stop(
                f"`{self.monitor}` became {float(value)} at batch {batch + 1}"
                + (f"; non-finite terms: {', '.join(bad)}" if bad else ""),
                logs,
            )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs or self.diverged:
            return
        value = float(logs[self.monitor])
        if not math.isfinite(value):
            self._stop(f"`{self.monitor}` became {value} in epoch {epoch + 1}", logs)
            return
        reference = max(self._best_magnitude, self.loss_floor)
        if self._best_logs is not None and abs(value) > self.factor * reference:
            self._stop(
                f"`{self.monitor}` reached {value:.4g} in epoch {epoch + 1}, more than "
                f"{self.factor:g}x its smallest magnitude so far ({reference:.4g}, "
                f"epoch {self.best_epoch + 1})",
                logs,
            )
            return
        if abs(value) < self._best_magnitude:
            self._remember(epoch, logs, weights=self.restore_best_weights)

    def _remember(self, epoch, logs, weights):
        """Makes `epoch` the best so far (with its weights if `weights`)."""
        self._best_magnitude = abs(float(logs[self.monitor]))
        self.best_epoch = epoch
        self._best_logs = {k: float(v) for k, v in logs.items() if v is not None}
        self._best_weights = [np.array(w) for w in self.model.get_weights()] if weights else None

    def _grown_most(self, logs):
        """`(term, before, now)` of the term whose magnitude grew most since the best epoch."""
        if not self._best_logs:
            return None
        growth = []
        for name, now in logs.items():
            if not _is_term(name) or name not in self._best_logs:
                continue
            now, before = float(now), self._best_logs[name]
            ratio = math.inf if not math.isfinite(now) else abs(now) / max(abs(before), 1e-12)
            growth.append((ratio, name, before, now))
        if not growth:
            return None
        _, name, before, now = max(growth)
        return name, before, now

    def _stop(self, what, logs):
        self.diverged = True
        self.model.stop_training = True
        grown = self._grown_most(logs or {})
        message = f"Training diverged: {what}."
        if grown:
            name, before, now = grown
            message += f" The term that grew most is `{name}` ({before:.4g} -> {now:.4g})."
        if self.restore_best_weights and self._best_weights is not None:
            self.model.set_weights(self._best_weights)
            message += f" Restored the weights of epoch {self.best_epoch + 1}."
        self.reason = message

    def get_config(self):
        return {
            "factor": self.factor,
            "loss_floor": self.loss_floor,
            "restore_best_weights": self.restore_best_weights,
            "monitor": self.monitor,
        }


class FastestCompilation(keras.callbacks.Callback):
    """Compiles the training step `compilations` times and keeps the fastest.

    A compiled step can be slow for as long as it is used. On the
    development machine (2-core Xeon with AMX, bfloat16) about one
    compilation of `adr_pgd`'s training step in eight ran 1.3-1.5x slower
    than the others: TensorFlow's oneDNN graph rewrite had left the max-pool
    gradients inside the attack's loop on TensorFlow's own kernel, and a
    new compilation was a new draw (docs/mixed-precision.md, "Slow compilations"). That kind
    is avoided since (the training attack is unrolled on CPUs); this
    callback guards against others. At the start of `fit` it
    times `steps` steps of the step Keras compiled, compiles it anew
    (`model.make_train_function(force=True)`), times it too, and so on, then
    hands `fit` the fastest (Keras calls `model.train_function` afresh for
    every step). Every timed step is a real training step: nothing is
    repeated or skipped, only the step's compiled program changes.

    Steps are timed from one batch end to the next, after `warmup_steps`
    untimed ones per compilation (the first traces it); an epoch boundary is
    not counted as a step. With fewer steps in the run than the timing needs,
    the step in use at the end is kept. A later `fit` keeps the chosen step.

    Args:
        compilations: How many compilations to time (1: do nothing).
        steps: Timed steps per compilation.
        warmup_steps: Untimed steps after each compilation.
        clock: Function returning the time in seconds (tests pass their own).

    Attributes:
        step_seconds: After the choice, the median step seconds of each
            compilation, in order.
        kept: After the choice, the index of the compilation kept.

    Raises:
        ValueError: At the start of `fit` under a strategy with several
            workers: each worker would choose on its own, and compilations
            that differ between workers must not run collectives together.
    """

    def __init__(
        self,
        compilations=DEFAULT_COMPILATIONS,
        steps=DEFAULT_TIMED_STEPS,
        warmup_steps=DEFAULT_WARMUP_STEPS,
        clock=time.perf_counter,
    ):
        super().__init__()
        self._clock = clock
        for name, value, least in (
            ("compilations", compilations, 1),
            ("steps", steps, 1),
            ("warmup_steps", warmup_steps, 1),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}; got {value!r}.")
        self.compilations = compilations
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.step_seconds = None
        self.kept = None
        self._kept_function = None

    def on_train_begin(self, logs=None):
        self._candidates = []  # (median step seconds, train_function)
        self._times, self._seen, self._last = [], 0, None
        chosen = self._kept_function is not None and self.model.train_function is (
            self._kept_function
        )
        self._done = self.compilations == 1 or chosen
        if not self._done and distribute.num_workers(self.model.distribute_strategy) > 1:
            raise ValueError(
                "FastestCompilation cannot run with several workers (each would keep its own "
                "compilation); leave it out, or use compilations=1."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None  # validation and epoch-end callbacks are not a step

    def on_train_batch_end(self, batch, logs=None):
        if self._done:
            return
        now = self._clock()
        self._seen += 1
        if self._seen > self.warmup_steps and self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        if len(self._times) < self.steps:
            return
        self._candidates.append((statistics.median(self._times), self.model.train_function))
        self._times, self._seen, self._last = [], 0, None
        if len(self._candidates) < self.compilations:
            self.model.make_train_function(force=True)
            return
        self.step_seconds = [seconds for seconds, _ in self._candidates]
        self.kept = min(range(len(self.step_seconds)), key=self.step_seconds.__getitem__)
        self._kept_function = self._candidates[self.kept][1]
        self.model.train_function = self._kept_function
        self._candidates = []  # Frees the others.
        self._done = True
        logging.info(
            "Training step compiled %d times: %s s/step; keeping compilation %d.",
            len(self.step_seconds),
            ", ".join(f"{seconds:.3f}" for seconds in self.step_seconds),
            self.kept + 1,
        )

    def get_config(self):
        return {
            "compilations": self.compilations,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
        }


class AtomicBackupAndRestore(_keras_compat.BackupAndRestoreHooks):
    """`keras.callbacks.BackupAndRestore` whose training state is replaced atomically.

    Each save writes the weights and the epoch into a fresh directory
    `<backup_dir>/state-*` and then points the symbolic link
    `<backup_dir>/latest` at it with one rename, so a kill at any moment
    leaves the previous state or the new one, never a torn file nor the
    weights of one epoch with the epoch number of another. Loading is
    Keras' own, through the link. Local file systems only (symbolic links).

    Args:
        backup_dir: Directory of the training state (this callback's alone).
        save_freq: `"epoch"` or a number of batches, as in Keras.
        delete_checkpoint: Delete `backup_dir` when `fit` ends, as in Keras.
    """

    _STATE_PREFIX = "state-"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        latest = os.path.join(backup_dir, "latest")
        # Keras restores from these two paths; they resolve through the link.
        super().__init__(
            backup_dir,
            os.path.join(latest, "latest.weights.h5"),
            os.path.join(latest, "training_metadata.json"),
            save_freq=save_freq,
            delete_checkpoint=delete_checkpoint,
        )
        self._latest = latest

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._remove_stale_states()

    def write_state(self, epoch, batch):
        os.makedirs(self.backup_dir, exist_ok=True)
        state, lock_fd = fileio.make_locked_temp_dir(self.backup_dir, self._STATE_PREFIX)
        try:
            self.model.save_weights(os.path.join(state, "latest.weights.h5"))
            metadata = {"epoch": epoch, "batch": batch}
            with open(os.path.join(state, "training_metadata.json"), "w") as f:
                json.dump(metadata, f)
            fileio.fsync_tree(state)
            link = fileio.unique_temp_path(self.backup_dir, ".latest-")
            os.symlink(os.path.basename(state), link)
            os.replace(link, self._latest)
            fileio.fsync_dir(self.backup_dir)
        except BaseException:
            shutil.rmtree(state, ignore_errors=True)
            raise
        finally:
            fileio.unlock(lock_fd)
        self._remove_stale_states()

    def _remove_stale_states(self):
        """Deletes every state but the linked one (left by a kill or replaced)."""
        if not os.path.isdir(self.backup_dir):
            return
        current = os.path.realpath(self._latest) if os.path.islink(self._latest) else None
        for name in os.listdir(self.backup_dir):
            path = os.path.join(self.backup_dir, name)
            if name.startswith(self._STATE_PREFIX) and os.path.realpath(path) != current:
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".latest-"):
                fileio.remove_quietly(path)


def _temp_prefix(name):
    """Prefix of the temporaries `AtomicModelCheckpoint` writes beside `name`."""
    return f".{name}.tmp-"


class AtomicModelCheckpoint(_keras_compat.ModelCheckpointHooks):
    """`keras.callbacks.ModelCheckpoint` whose file is replaced atomically.

    The checkpoint is written beside its final path (a hidden name with the
    same suffix, which `Model.save` requires) and renamed over it, so a kill
    while saving leaves the previous checkpoint intact; the temporary file a
    kill leaves behind is deleted when training starts again.

    Args:
        *args: As `keras.callbacks.ModelCheckpoint`.
        save_averaged_weights: Save the optimizer's moving average of the
            weights (`use_ema=True`) instead of the trained weights: what a
            validation run with `keras.callbacks.SwapEMAWeights()` measured,
            so the checkpoint chosen by a validation metric is the model that
            metric describes. Leave it False with
            `SwapEMAWeights(swap_on_epoch=True)`, which has already put the
            average in place.
        **kwargs: As `keras.callbacks.ModelCheckpoint`.
    """

    def __init__(self, *args, save_averaged_weights=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_averaged_weights = save_averaged_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.save_averaged_weights and not _keras_compat.uses_ema(self.model):
            raise ValueError(
                "AtomicModelCheckpoint(save_averaged_weights=True) needs an optimizer that "
                "keeps an average of the weights: compile with e.g. "
                "keras.optimizers.Adam(use_ema=True)."
            )
        if "{" in self.filepath:  # A formatted name: its temporaries are not known.
            return
        directory, name = os.path.split(os.path.abspath(self.filepath))
        if os.path.isdir(directory):
            for other in os.listdir(directory):
                if other.startswith(_temp_prefix(name)):
                    fileio.remove_quietly(os.path.join(directory, other))

    def write_checkpoint(self, final_path):
        directory, name = os.path.split(os.path.abspath(final_path))
        os.makedirs(directory, exist_ok=True)
        suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
        temp_path = fileio.unique_temp_path(directory, _temp_prefix(name)) + suffix
        averaged = (
            _keras_compat.averaged_weights(self.model)
            if self.save_averaged_weights
            else contextlib.nullcontext()
        )
        try:
            with averaged:
                if self.save_weights_only:
                    self.model.save_weights(temp_path, overwrite=True)
                else:
                    self.model.save(temp_path, overwrite=True)
            os.replace(temp_path, final_path)
        finally:
            fileio.remove_quietly(temp_path)
        fileio.fsync_dir(directory)
