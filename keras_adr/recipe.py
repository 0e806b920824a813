"""The training recipe, and the options of a run (`TrainOptions`).

`RECIPE` (data, model, optimizer, schedule and training attack) is the one
place these defaults live. `adr-train` (`TrainOptions`),
`benchmarks/stability.py` and the benchmark presets all start from it and
change only what their study varies.
"""

import dataclasses

from keras_adr import config as config_lib
from keras_adr import data, models, precision, specs
from keras_adr.config import DEFAULT_DIVERGENCE_FACTOR
from keras_adr.specs import EVAL_ATTACKS


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


# Fashion-MNIST, small CNN, L-inf 0.1, PGD-10 (step 0.025), Adam 1e-3 decayed
# x0.1 at 50% and 75%, batch 128, 10 epochs: the frontier study's recipe. The
# studies before it ran PGD-5 (step 0.05) and pin it
# (benchmarks/robustness_presets.PGD5_RECIPE).
RECIPE = Recipe()

OPTIMIZERS = ("sgd", "adam")
EXPORT_WEIGHTS = ("best", "final")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Everything about a run that is not an ADR hyperparameter.

    The training defaults are those of `keras_adr.recipe.RECIPE`.

    Attributes:
        dataset: A name of `keras_adr.data.DATASETS`.
        model: A name of `keras_adr.models.ARCHITECTURES`.
        defense: The preset name the `ADRConfig` came from (recorded only).
        epochs: Training epochs.
        batch_size: Global batch size.
        optimizer: `"sgd"` (momentum 0.9, Nesterov off) or `"adam"`.
        learning_rate: Initial learning rate.
        lr_decay_fractions: Fractions of training after which the learning
            rate is multiplied by 0.1 (piecewise constant schedule).
        weight_decay: Decoupled weight decay of the optimizer (0 = off).
        ema_momentum: Momentum of the optimizer's exponential moving average
            of the weights (Keras' `use_ema`; 0 = off, e.g. 0.999). When on,
            validation, the checkpoint `best.keras`, the final weights, the
            evaluation and the export all use the averaged weights, and the
            backup of an interrupted run keeps the average.
        seed: Random seed for weights, shuffling and attacks.
        train_examples: Use only the first N training examples (None = all).
        validation_examples: Held out from the end of the training split to
            select the best checkpoint by robust accuracy (0 = no validation).
        validation_epsilon: Epsilon of the validation attack that selects the
            checkpoint (None: the training attack's). Its step size is the
            training attack's, scaled by the ratio of the epsilons.
        test_examples: Evaluate on the first N test examples (None = all).
        eval_attacks: Attacks of the final evaluation (see
            `keras_adr.evaluation`; at least one PGD and one APGD attack);
            robust accuracy is their per-example worst case.
        output_dir: Where logs, checkpoints, metrics and the export go.
        data_dir: Optional dataset directory (IDX files or TFDS data_dir).
        strategy: A name of `keras_adr.distribute.STRATEGIES`.
        sync_batchnorm: Synchronized BatchNorm for the ResNets.
        export: Export a SavedModel at the end.
        export_weights: `"best"`: the final evaluation and the export use the
            checkpoint of the best robust validation accuracy (`best.keras`);
            `"final"`: the weights of the last epoch.
        divergence_factor: `DivergenceGuard` stops the run when the epoch
            loss's magnitude exceeds this multiple of its running minimum
            (0 = only non-finite losses stop it).
        precision: The Keras dtype policy of training, one of
            `keras_adr.precision.PRECISIONS` (`"auto"`: bfloat16 on CPUs
            with AMX and on GPUs of compute capability 8.0 and newer, see
            `keras_adr.precision.resolve`). The final
            evaluation and the exported SavedModel compute in float32
            whatever the training precision.
        compilations: How many times to compile the training step at the
            start of training, keeping the one whose steps ran fastest
            (`keras_adr.callbacks.FastestCompilation`; it only changes
            speed; 1 = compile once). A guard against slow compilations;
            the one kind measured is avoided anyway (`pgd(unroll=True)`).
            More than 1 needs a single worker.
        deterministic: Run TensorFlow's ops deterministically
            (`tf.config.experimental.enable_op_determinism`): the same
            command gives the same weights, and a run killed and resumed
            ends with the weights of an uninterrupted one. Slower on some
            ops; off by default.
        verbose: Keras verbosity for `fit` (0, 1 or 2).
        command: The command line, recorded in the outputs.
    """

    dataset: str = RECIPE.dataset
    model: str = RECIPE.model
    defense: str = "adr_pgd"
    epochs: int = RECIPE.epochs
    batch_size: int = RECIPE.batch_size
    optimizer: str = RECIPE.optimizer
    learning_rate: float = RECIPE.learning_rate
    lr_decay_fractions: tuple = RECIPE.lr_decay_fractions
    weight_decay: float = RECIPE.weight_decay
    ema_momentum: float = 0.0
    seed: int = RECIPE.seed
    train_examples: int = None
    validation_examples: int = RECIPE.validation_examples
    validation_epsilon: float = None
    test_examples: int = None
    eval_attacks: tuple = EVAL_ATTACKS
    output_dir: str = "runs/default"
    data_dir: str = None
    strategy: str = "auto"
    sync_batchnorm: bool = False
    export: bool = True
    export_weights: str = "best"
    divergence_factor: float = DEFAULT_DIVERGENCE_FACTOR
    # float32 until bfloat16 training is shown to keep robustness (issue 14).
    precision: str = "float32"
    compilations: int = 1
    deterministic: bool = False
    verbose: int = 1
    command: str = ""

    def __post_init__(self):
        if self.dataset not in data.DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; valid: {', '.join(data.DATASETS)}."
            )
        if self.model not in models.ARCHITECTURES:
            raise ValueError(
                f"Unknown model {self.model!r}; valid: {', '.join(models.ARCHITECTURES)}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; valid: {OPTIMIZERS}.")
        if self.precision not in precision.PRECISIONS:
            raise ValueError(
                f"Unknown precision {self.precision!r}; valid: {', '.join(precision.PRECISIONS)}."
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; got {self.learning_rate}.")
        if any(not 0 < f < 1 for f in self.lr_decay_fractions) or list(
            self.lr_decay_fractions
        ) != sorted(self.lr_decay_fractions):
            raise ValueError(
                "`lr_decay_fractions` must be increasing fractions in (0, 1); got "
                f"{self.lr_decay_fractions}."
            )
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None; got {value}.")
        if self.export_weights not in EXPORT_WEIGHTS:
            raise ValueError(
                f"`export_weights` must be one of {EXPORT_WEIGHTS}; got {self.export_weights!r}."
            )
        if not (self.divergence_factor == 0 or self.divergence_factor > 1):
            raise ValueError(
                f"`divergence_factor` must be 0 (off) or > 1; got {self.divergence_factor}."
            )
        specs.parse_suite(self.eval_attacks)  # fail before training, not after
        self._check_run_numbers()

    def _check_run_numbers(self):
        if not isinstance(self.compilations, int) or self.compilations < 1:
            raise ValueError(
                "`compilations` (--compilations) must be an integer >= 1; got "
                f"{self.compilations!r}."
            )
        if self.validation_examples < 0:
            raise ValueError(f"`validation_examples` must be >= 0; got {self.validation_examples}.")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(
                f"`ema_momentum` (--ema_momentum) must be in [0, 1) (0 = off, e.g. 0.999); got "
                f"{self.ema_momentum}."
            )
        if self.validation_epsilon is not None and not self.validation_epsilon > 0:
            raise ValueError(
                f"`validation_epsilon` must be > 0 or None; got {self.validation_epsilon}."
            )
