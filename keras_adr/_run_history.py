"""A run's `history.csv`: reading it, its best logged value, and the check that it stayed finite."""

import csv
import math
import os


class TrainingDivergedError(RuntimeError):
    """The loss became non-finite or ran away and `DivergenceGuard` stopped training."""


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


def best_logged(history_path, monitor):
    """Best `monitor` value of the epochs already logged by an interrupted run.

    A resumed run's `ModelCheckpoint` starts from it, so that `best.keras`
    is not replaced by a worse epoch after a restart.
    """
    values = read_history(history_path).get(monitor, [])
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def check_finite(history):
    for name, values in history.items():
        for epoch, value in enumerate(values):
            if value is not None and not math.isfinite(value):
                raise TrainingDivergedError(
                    f"Training diverged: `{name}` became {value} in epoch {epoch + 1}; "
                    "the run was stopped. Lower --learning_rate, or check the ADR weights "
                    "and the data."
                )


def logged_epochs(path):
    """`{epoch: {column: value}}` of `history.csv` (empty if there is none)."""
    history = read_history(path)
    return {
        epoch: {k: v[i] for k, v in history.items() if k != "epoch"}
        for i, epoch in enumerate(history.get("epoch", []))
    }


def best_epoch(path, monitor):
    """The 1-based epoch of the best (largest) `monitor` value logged, or None."""
    history = read_history(path)
    values = [-math.inf if v is None else v for v in history.get(monitor, [])]
    if not values:
        return None
    return history["epoch"][values.index(max(values))] + 1
