"""adr-train: train an ADR (or baseline) classifier, evaluate it, export it.

With no flags: ADR on PGD-AT, Fashion-MNIST, small CNN, epsilon 0.1, one
epoch, then clean / PGD-20 / APGD-CE evaluation on the test set and a
SavedModel export under --output_dir.

Distributed training: `--strategy=mirrored` uses all local GPUs (or all
logical CPU devices); `--strategy=multi_worker` runs one process per worker,
each started with the same flags and its own `TF_CONFIG`. `--cpu_replicas=N`
is a testing aid that splits the CPU into N logical devices first, so that
`--strategy=mirrored` runs N replicas on a machine without GPUs.
"""

import shlex
import sys

from absl import app, flags, logging

from keras_adr import cli
from keras_adr import config as config_lib
from keras_adr import data, distribute, models, pipeline, presets

FLAGS = flags.FLAGS
_DEFAULTS = pipeline.TrainOptions()

flags.DEFINE_enum("dataset", _DEFAULTS.dataset, data.DATASETS, "Dataset.")
flags.DEFINE_string("data_dir", None, "Directory with the dataset (IDX files or a TFDS data_dir).")
flags.DEFINE_enum("model", _DEFAULTS.model, models.ARCHITECTURES, "Architecture.")
flags.DEFINE_enum("defense", _DEFAULTS.defense, presets.NAMES, "Training preset.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size.")
flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, pipeline.OPTIMIZERS,
                  "Optimizer (sgd = momentum 0.9).")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Initial learning rate.")
flags.DEFINE_list("lr_decay_fractions", [str(f) for f in _DEFAULTS.lr_decay_fractions],
                  "Fractions of training after which the learning rate is multiplied by 0.1.")
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "Decoupled weight decay (0 = off).")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed.")
flags.DEFINE_integer("train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer("validation_examples", _DEFAULTS.validation_examples,
                     "Examples held out from the end of train to pick the best checkpoint.")
flags.DEFINE_integer("test_examples", None, "Evaluate on the first N test examples.")
flags.DEFINE_list("eval_attacks", list(_DEFAULTS.eval_attacks),
                  "Attacks of the final evaluation; robust accuracy is their worst case.")
flags.DEFINE_string("output_dir", _DEFAULTS.output_dir,
                    "Output directory; rerunning with the same one resumes training.")
flags.DEFINE_enum("strategy", _DEFAULTS.strategy, distribute.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("cpu_replicas", 0,
                     "Testing aid: split the CPU into N logical devices before TensorFlow starts, "
                     "so --strategy=mirrored runs N replicas without GPUs (0 = don't split).")
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm (ResNets, multi-replica).")
flags.DEFINE_bool("export", True, "Export a SavedModel at the end.")
flags.DEFINE_enum("export_weights", _DEFAULTS.export_weights, pipeline.EXPORT_WEIGHTS,
                  "Weights that are evaluated and exported: best = the checkpoint of the best "
                  "robust validation accuracy (best.keras), final = the last epoch's.")
flags.DEFINE_float("divergence_factor", _DEFAULTS.divergence_factor,
                   "Stop (exit 1, best weights restored) when the epoch loss's magnitude exceeds "
                   "this multiple of its running minimum; 0 = stop only on NaN/inf.")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line/epoch.")

# Attack flags: unset means the preset's value.
flags.DEFINE_enum("norm", None, config_lib.NORMS, "Threat model norm.")
flags.DEFINE_float("epsilon", None, "Attack radius in [0, 1] pixel units.")
flags.DEFINE_float("step_size", None, "Attack step size.")
flags.DEFINE_integer("attack_steps", None, "Attack steps during training.")
flags.DEFINE_bool("random_start", None, "Random start of the PGD attack.")
flags.DEFINE_enum("attack_loss", None, config_lib.ATTACK_LOSSES, "Training attack loss.")

# One flag per objective weight / ADR hyperparameter: unset means the preset's.
_FLOAT_FIELDS = ("natural_weight", "adversarial_weight", "trades_beta") + config_lib.ADR_TERMS + (
    "label_scale", "propagation_alpha")
for _name in _FLOAT_FIELDS:
    flags.DEFINE_float(_name, None, f"ADRConfig.{_name} (default: the preset's).")
flags.DEFINE_integer("propagation_neighbors", None, "k of the label-propagation k-NN graph.")
flags.DEFINE_enum("compactness_distance", None, config_lib.DISTANCES, "Local compactness distance.")
flags.DEFINE_enum("latent_normalization", None, config_lib.LATENT_NORMALIZATIONS,
                  "Compactness on RMS-normalised codes (rms, bounded) or raw codes (none, the "
                  "paper's); default: the preset's.")
flags.DEFINE_enum("smoothness_push", None, config_lib.SMOOTHNESS_PUSHES,
                  "Different-label global smoothness: overlap (bounded) or cross_entropy (the "
                  "paper's); default: the preset's.")
flags.DEFINE_enum("pairwise_scope", None, config_lib.PAIRWISE_SCOPES,
                  "global: pairwise terms over the global batch; replica: per replica.")

# Library defaults that differ for the default run (Fashion-MNIST, eps 0.1):
# 5 attack steps of 2.5 * eps / 5 keep one epoch within the time budget.
_RUN_DEFAULTS = {"attack_epsilon": 0.1, "attack_steps": 5, "attack_step_size": 0.05}


def adr_config_from_flags():
    overrides = dict(_RUN_DEFAULTS)
    for flag, field in (("norm", "attack_norm"), ("epsilon", "attack_epsilon"),
                        ("step_size", "attack_step_size"), ("attack_steps", "attack_steps"),
                        ("random_start", "attack_random_start"), ("attack_loss", "attack_loss")):
        if FLAGS[flag].value is not None:
            overrides[field] = FLAGS[flag].value
    if FLAGS.epsilon is not None and FLAGS.step_size is None:
        overrides["attack_step_size"] = 2.5 * FLAGS.epsilon / overrides["attack_steps"]
    for name in _FLOAT_FIELDS + ("propagation_neighbors", "compactness_distance",
                                 "latent_normalization", "smoothness_push", "pairwise_scope"):
        if FLAGS[name].value is not None:
            overrides[name] = FLAGS[name].value
    return presets.get(FLAGS.defense, **overrides)


def _fractions(values):
    try:
        return tuple(float(f) for f in values)
    except ValueError:
        raise ValueError(f"--lr_decay_fractions must be numbers in (0, 1), e.g. 0.5,0.75; got "
                         f"{','.join(values)}.") from None


def options_from_flags():
    return pipeline.TrainOptions(
        dataset=FLAGS.dataset, model=FLAGS.model, defense=FLAGS.defense, epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        lr_decay_fractions=_fractions(FLAGS.lr_decay_fractions),
        weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, train_examples=FLAGS.train_examples,
        validation_examples=FLAGS.validation_examples, test_examples=FLAGS.test_examples,
        eval_attacks=tuple(FLAGS.eval_attacks),
        output_dir=FLAGS.output_dir, data_dir=FLAGS.data_dir, strategy=FLAGS.strategy,
        sync_batchnorm=FLAGS.sync_batchnorm, export=FLAGS.export,
        export_weights=FLAGS.export_weights, divergence_factor=FLAGS.divergence_factor,
        verbose=FLAGS.verbose,
        command=" ".join(shlex.quote(a) for a in ["adr-train", *sys.argv[1:]]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.cpu_replicas < 0:
        raise app.UsageError(f"--cpu_replicas must be >= 0; got {FLAGS.cpu_replicas}.")
    try:
        if FLAGS.cpu_replicas:
            # Before any TensorFlow op: logical devices are fixed at initialisation.
            distribute.split_cpu(FLAGS.cpu_replicas)
        adr_config = adr_config_from_flags()
        options = options_from_flags()
        metrics = pipeline.run(options, adr_config)
    except (ValueError, data.DatasetNotFoundError, pipeline.TrainingDivergedError) as error:
        logging.error("%s", error)
        print(f"adr-train: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(pipeline.format_summary(metrics))


def run():
    cli.run_program(main, __name__)


if __name__ == "__main__":
    run()
