"""keras_adr._keras_compat: the one module that uses Keras' private API, fenced by version."""

import pathlib
import re

import keras
import pytest

from keras_adr import _keras_compat, distribute

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_adr"
# Keras private names keras-adr has needed; none may appear outside the compat module.
_KERAS_PRIVATE = (
    "_save_model",
    "_get_file_path",
    "_should_save_model",
    "_weights_path",
    "_training_metadata_path",
    "_current_epoch",
    "_last_batch_seen",
    "_maybe_symbolic_build",
    "_compile_metrics",
    "_swap_variables",
    "_model_variables_moving_average",
    "_trainable_variables",
)


def test_versions_outside_the_tested_range_are_refused_with_what_to_install():
    low, high = _keras_compat.KERAS_RANGE
    _keras_compat.check_keras_version()  # the installed Keras is a tested one
    _keras_compat.check_keras_version(f"{low[0]}.{low[1]}.0")
    for version in (f"{low[0]}.{low[1] - 1}.9", f"{high[0]}.{high[1]}.0", "4.0.0", "nightly"):
        with pytest.raises(_keras_compat.UnsupportedKerasError, match=r"pip install 'keras>="):
            _keras_compat.check_keras_version(version)
    assert distribute.KERAS_PATCH_RANGE == _keras_compat.KERAS_RANGE  # one range


def test_keras_private_names_are_used_only_in_the_compat_module():
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in _KERAS_PRIVATE) + r")\b")
    found = [
        f"{path.relative_to(_PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(_PACKAGE.rglob("*.py"))
        if path.name != "_keras_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, "\n".join(found)


def test_the_hooks_say_what_a_subclass_must_write(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    checkpoint = _keras_compat.ModelCheckpointHooks(str(tmp_path / "m.keras"))
    backup = _keras_compat.BackupAndRestoreHooks(
        str(tmp_path / "b"), str(tmp_path / "w.weights.h5"), str(tmp_path / "m.json")
    )
    with pytest.raises(NotImplementedError):
        checkpoint.write_checkpoint(str(tmp_path / "m.keras"))
    with pytest.raises(NotImplementedError):
        backup.write_state(0, 0)
