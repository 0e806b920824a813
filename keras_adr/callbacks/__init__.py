"""Keras callbacks for robust training runs, one callback per module.

- `epoch_seconds`: `EpochSeconds`, each epoch's wall time in the logs.
- `epoch_variable`: `EpochVariable`, a variable holding the epoch being
  trained (the data order of `keras_adr.data.load(..., epoch=)`).
- `robust_accuracy`: `RobustAccuracy`, the worst-case accuracy under an
  attack suite on held-out data, for `ModelCheckpoint`, `EarlyStopping` and
  TensorBoard.
- `divergence_guard`: `DivergenceGuard`, stops a run whose loss is not
  finite or has run away, restores the last healthy weights and says which
  term grew most.
- `fastest_compilation`: `FastestCompilation`, compiles the training step
  several times at the start of `fit` and keeps the fastest.
- `atomic_backup_and_restore`: `AtomicBackupAndRestore`, Keras'
  `BackupAndRestore` whose training state is replaced in one rename.
- `atomic_model_checkpoint`: `AtomicModelCheckpoint`, Keras'
  `ModelCheckpoint` whose file is replaced in one rename.
"""

from keras_adr.callbacks.atomic_backup_and_restore import AtomicBackupAndRestore
from keras_adr.callbacks.atomic_model_checkpoint import AtomicModelCheckpoint
from keras_adr.callbacks.divergence_guard import (
    DEFAULT_DIVERGENCE_FACTOR,
    DEFAULT_LOSS_FLOOR,
    DivergenceGuard,
)
from keras_adr.callbacks.epoch_seconds import EpochSeconds
from keras_adr.callbacks.epoch_variable import EpochVariable
from keras_adr.callbacks.fastest_compilation import (
    DEFAULT_COMPILATIONS,
    DEFAULT_TIMED_STEPS,
    DEFAULT_WARMUP_STEPS,
    FastestCompilation,
)
from keras_adr.callbacks.robust_accuracy import RobustAccuracy

__all__ = [
    "EpochSeconds",
    "EpochVariable",
    "RobustAccuracy",
    "DivergenceGuard",
    "FastestCompilation",
    "AtomicBackupAndRestore",
    "AtomicModelCheckpoint",
    "DEFAULT_DIVERGENCE_FACTOR",
    "DEFAULT_LOSS_FLOOR",
    "DEFAULT_COMPILATIONS",
    "DEFAULT_TIMED_STEPS",
    "DEFAULT_WARMUP_STEPS",
]
