"""keras-adr: Adversary Divergence Reduction adversarial training for Keras 3.

Public API: `ADRConfig`, `AttackConfig`, `ADRModel`, `ADRMixin`, `presets`,
and the submodules `attacks`, `callbacks`, `layers`, `losses`, `graph`,
`models`, `data`, `evaluation`, `export`, `serving`, `distribute` (`pipeline`
runs a whole training job and is imported on its own).
"""

from keras_adr import attacks
from keras_adr import callbacks
from keras_adr import data
from keras_adr import distribute
from keras_adr import evaluation
from keras_adr import export
from keras_adr import graph
from keras_adr import layers
from keras_adr import losses
from keras_adr import models
from keras_adr import presets
from keras_adr import serving
from keras_adr.config import ADRConfig, AttackConfig
from keras_adr.training import ADRMixin, ADRModel

__version__ = "0.1.0"

__all__ = [
    "ADRConfig", "AttackConfig", "ADRMixin", "ADRModel",
    "attacks", "callbacks", "data", "distribute", "evaluation", "export", "graph", "layers",
    "losses", "models", "presets", "serving",
]
