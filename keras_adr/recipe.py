"""The training recipe: data, model, optimizer, schedule and training attack.

`RECIPE` is the one place these defaults live. `adr-train`
(`pipeline.TrainOptions`), `benchmarks/stability.py` and the benchmark
presets all start from it and change only what their study varies.
"""

import dataclasses

from keras_adr import config as config_lib
from keras_adr import data


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is trained, apart from the ADR weights.

    Attributes:
        dataset: A name of `keras_adr.data.DATASETS`.
        model: A name of `keras_adr.models.ARCHITECTURES`.
        epochs: Training epochs.
        batch_size: Global batch size.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9).
        learning_rate: Initial learning rate.
        lr_decay_fractions: Fractions of training after which the learning
            rate is multiplied by 0.1.
        weight_decay: Decoupled weight decay (0 = off).
        validation_examples: Held out from the end of the training split to
            choose the checkpoint.
        seed: Random seed of the weights, the shuffling and the attacks.
        epsilon: Radius of the training attack (L-inf, pixels in [0, 1]).
        attack_steps: Steps of the training attack.
    """

    dataset: str = data.DEFAULT_DATASET
    model: str = "small_cnn"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_decay_fractions: tuple = (0.5, 0.75)
    weight_decay: float = 0.0
    validation_examples: int = 2000
    seed: int = 0
    epsilon: float = config_lib.AttackConfig.epsilon
    attack_steps: int = config_lib.AttackConfig.steps

    @property
    def attack_step_size(self):
        """The training attack's step size, `2.5 * epsilon / steps` (rounded to 1e-6)."""
        return round(config_lib.pgd_step_size(self.epsilon, self.attack_steps), 6)


# Fashion-MNIST, small CNN, L-inf 0.1, PGD-5 (step 0.05), Adam 1e-3 decayed
# x0.1 at 50% and 75%, batch 128, 10 epochs: the recipe of every
# Fashion-MNIST study in benchmarks/.
RECIPE = Recipe()
