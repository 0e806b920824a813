"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, and every
module of the module map, reachable as `keras_adr.<module>` after
`import keras_adr`: `adr_model`, `attacks`, `callbacks`, `config`, `data`,
`distribute`, `evaluation`, `export`, `fileio`, `graph`, `layers`, `losses`,
`models`, `objective`, `pairwise`, `pipeline`, `precision`, `presets`,
`recipe`, `rundir`, `serving`, `signatures`, `specs`, `training`.
"""

# Before TensorFlow: the programs start quietly (a library import is unchanged).
from keras_adr import _startup  # isort: skip

_startup.quiet_tensorflow_if_program()

# `pipeline` imports nothing that the other modules do not import already, so
# importing it here costs little; the CLIs (`keras_adr.cli`) stay on their own.
from keras_adr import (  # noqa: E402
    adr_model,
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
    specs,
    training,
)
from keras_adr._version import __version__  # noqa: E402
from keras_adr.adr_model import ADRModel  # noqa: E402
from keras_adr.config import ADRConfig, AttackConfig  # noqa: E402
from keras_adr.training import ADRMixin  # noqa: E402

__all__ = [
    "__version__",
    "ADRConfig",
    "AttackConfig",
    "ADRMixin",
    "ADRModel",
    "adr_model",
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
    "specs",
    "signatures",
    "training",
]
