"""`DivergenceGuard`: stops a run whose objective has run away.

`DivergenceGuard` stops a run whose objective has run away. `TerminateOnNaN`
alone lets a run end as a collapsed model (the paper's ADR objective falls
without bound for epochs before anything becomes NaN), and `fit` returns
normally either way; the guard restores the last healthy weights and says
which term grew most, so a program can exit non-zero with that message.
"""

import math

import keras
import numpy as np

from keras_adr.config import DEFAULT_DIVERGENCE_FACTOR

# Losses closer to 0 than this are compared with it instead: a near-zero
# minimum would make ordinary noise look like a blow-up.
DEFAULT_LOSS_FLOOR = 0.1


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
