"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, `presets`,
and the submodules `attacks`, `callbacks`, `layers`, `losses`, `graph`,
`models`, `data`, `evaluation`, `export`, `serving`, `distribute` (`pipeline`
runs a whole training job and is imported on its own).
"""

from keras_adr import (
    attacks,
    callbacks,
    data,
    distribute,
    evaluation,
    export,
    graph,
    layers,
    losses,
    models,
    presets,
    serving,
)
from keras_adr.config import ADRConfig, AttackConfig
from keras_adr.training import ADRMixin, ADRModel

__version__ = "0.1.0"

__all__ = [
    "ADRConfig",
    "AttackConfig",
    "ADRMixin",
    "ADRModel",
    "attacks",
    "callbacks",
    "data",
    "distribute",
    "evaluation",
    "export",
    "graph",
    "layers",
    "losses",
    "models",
    "presets",
    "serving",
]
