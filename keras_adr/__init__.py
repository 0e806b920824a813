"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, `presets`,
and the submodules `attacks`, `callbacks`, `layers`, `losses`, `graph`,
`models`, `data`, `evaluation`, `export`, `serving`, `distribute` (`pipeline`
runs a whole training job and is imported on its own).
"""

# Before TensorFlow: the programs start quietly (a library import is unchanged).
from keras_adr import _startup  # isort: skip

_startup.quiet_tensorflow_if_program()

from keras_adr import (  # noqa: E402
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
