"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, and every
module of the module map, reachable as `keras_adr.<module>` after
`import keras_adr`: `attacks`, `callbacks`, `config`, `data`, `distribute`,
`evaluation`, `export`, `fileio`, `graph`, `layers`, `losses`, `models`,
`objective`, `pairwise`, `pipeline`, `precision`, `presets`, `rundir`,
`serving`, `training`.
"""

# `pipeline` imports nothing that the other modules do not import already, so
# importing it here costs little; the CLIs (`keras_adr.cli`) stay on their own.
from keras_adr import (
    attacks,
    callbacks,
    config,
    data,
    distribute,
    evaluation,
    export,
    fileio,
    graph,
    layers,
    losses,
    models,
    objective,
    pairwise,
    pipeline,
    precision,
    presets,
    rundir,
    serving,
    training,
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
    "config",
    "data",
    "distribute",
    "evaluation",
    "export",
    "fileio",
    "graph",
    "layers",
    "losses",
    "models",
    "objective",
    "pairwise",
    "pipeline",
    "precision",
    "presets",
    "rundir",
    "serving",
    "training",
]
