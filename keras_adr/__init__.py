"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, and every
module of the module map, reachable as `keras_adr.<module>` after
`import keras_adr`: `attacks`, `callbacks`, `config`, `data`, `distribute`,
`evaluation`, `export`, `fileio`, `graph`, `layers`, `losses`, `models`,
`objective`, `pairwise`, `pipeline`, `precision`, `presets`, `recipe`,
`rundir`, `serving`, `signatures`, `training`.
"""

# Before TensorFlow: the programs start quietly (a library import is unchanged).
from keras_adr import _startup  # isort: skip

_startup.quiet_tensorflow_if_program()

# `pipeline` imports nothing that the other modules do not import already, so
# importing it here costs little; the CLIs (`keras_adr.cli`) stay on their own.
from keras_adr import (  # noqa: E402
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
    recipe,
    rundir,
    serving,
    signatures,
    training,
)
from keras_adr._version import __version__  # noqa: E402
from keras_adr.config import ADRConfig, AttackConfig  # noqa: E402
from keras_adr.training import ADRMixin, ADRModel  # noqa: E402

__all__ = [
    "__version__",
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
    "recipe",
    "rundir",
    "serving",
    "signatures",
    "training",
]
