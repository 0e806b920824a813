"""The examples of docs/bring-your-own-model.md, run as written, block after block."""

import os

import keras
import numpy as np
import pytest
from test_readme import _ROOT, code_blocks

import keras_adr

# test_readme.py leaves this page's blocks to this file.
_PAGE = os.path.join(_ROOT, "docs", "bring-your-own-model.md")


@pytest.mark.slow
def test_bring_your_own_model_examples_run(tmp_path, monkeypatch):
    blocks = [(lang, text) for _, lang, text in code_blocks([_PAGE])]
    assert [language for language, _ in blocks] == ["python"] * 4
    monkeypatch.chdir(tmp_path)  # ModelCheckpoint writes best.keras here.
    namespace = {"__name__": "readme"}
    for _, code in blocks:
        exec(compile(code, _PAGE, "exec"), namespace)

    functional, sequential, subclassed = (
        namespace[name] for name in ("functional", "sequential", "subclassed")
    )
    assert isinstance(functional.backbone, keras.Model)
    assert not isinstance(functional.backbone, keras.Sequential)
    assert isinstance(sequential.backbone, keras.Sequential)
    assert isinstance(subclassed, keras_adr.ADRMixin)
    for model in (functional, sequential, subclassed):
        # fit ran its steps with the ADR step and the callbacks logged into the history.
        history = model.history.history
        assert 0.0 <= history["val_robust_accuracy"][0] <= history["val_robust_accuracy_clean"][0]
        assert np.isfinite(history["loss"]).all() and "local_compactness" in history
    # The checkpoint that ModelCheckpoint wrote from val_robust_accuracy loads and predicts.
    x = namespace["x"][:4]
    assert namespace["best"].predict(x, verbose=0).shape == (4, 10)
