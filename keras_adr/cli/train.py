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

import tensorflow as tf
from absl import app, flags

from keras_adr import cli, data, distribute, models, pipeline, precision, presets
from keras_adr import config as config_lib

FLAGS = flags.FLAGS
_DEFAULTS = pipeline.TrainOptions()

flags.DEFINE_enum("dataset", _DEFAULTS.dataset, data.DATASETS, "Dataset.")
flags.DEFINE_string("data_dir", None, "Directory with the dataset (IDX files or a TFDS data_dir).")
flags.DEFINE_enum("model", _DEFAULTS.model, models.ARCHITECTURES, "Architecture.")
flags.DEFINE_enum("defense", _DEFAULTS.defense, presets.NAMES, "Training preset.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size.")
flags.DEFINE_enum(
    "optimizer", _DEFAULTS.optimizer, pipeline.OPTIMIZERS, "Optimizer (sgd = momentum 0.9)."
)
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Initial learning rate.")
flags.DEFINE_list(
    "lr_decay_fractions",
    [str(f) for f in _DEFAULTS.lr_decay_fractions],
    "Fractions of training after which the learning rate is multiplied by 0.1.",
)
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "Decoupled weight decay (0 = off).")
flags.DEFINE_float(
    "ema_momentum",
    _DEFAULTS.ema_momentum,
    "Exponential moving average of the weights (Keras' optimizer use_ema), e.g. 0.999; "
    "0 = off. Validation, best.keras, the evaluation and the export use the average.",
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed.")
flags.DEFINE_integer("train_examples", None, "Use only the first N training examples.")
flags.DEFINE_integer(
    "validation_examples",
    _DEFAULTS.validation_examples,
    "Examples held out from the end of train to pick the best checkpoint.",
)
flags.DEFINE_float(
    "validation_epsilon",
    None,
    "Epsilon of the validation attack that selects best.keras (default: the training "
    "--epsilon), e.g. the test threat model when training at a larger epsilon.",
)
flags.DEFINE_integer("test_examples", None, "Evaluate on the first N test examples.")
flags.DEFINE_list(
    "eval_attacks",
    list(_DEFAULTS.eval_attacks),
    "Attacks of the final evaluation; robust accuracy is their worst case.",
)
flags.DEFINE_string(
    "output_dir",
    _DEFAULTS.output_dir,
    "Output directory; rerunning with the same one resumes training.",
)
flags.DEFINE_enum("strategy", _DEFAULTS.strategy, distribute.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer(
    "cpu_replicas",
    0,
    "Testing aid: split the CPU into N logical devices before TensorFlow starts, "
    "so --strategy=mirrored runs N replicas without GPUs (0 = don't split).",
)
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm (ResNets, multi-replica).")
flags.DEFINE_bool("export", True, "Export a SavedModel at the end.")
flags.DEFINE_bool(
    "deterministic",
    _DEFAULTS.deterministic,
    "Deterministic TensorFlow ops: the same command gives the same weights, also "
    "across a kill and resume.",
)
flags.DEFINE_enum(
    "export_weights",
    _DEFAULTS.export_weights,
    pipeline.EXPORT_WEIGHTS,
    "Weights that are evaluated and exported: best = the checkpoint of the best "
    "robust validation accuracy (best.keras), final = the last epoch's.",
)
flags.DEFINE_float(
    "divergence_factor",
    _DEFAULTS.divergence_factor,
    "Stop (exit 1, best weights restored) when the epoch loss's magnitude exceeds "
    "this multiple of its running minimum; 0 = stop only on NaN/inf.",
)
flags.DEFINE_enum(
    "precision",
    _DEFAULTS.precision,
    precision.PRECISIONS,
    "Training precision (Keras dtype policy): auto = mixed_bfloat16 on CPUs with AMX "
    "and on GPUs of compute capability >= 8.0; on CPUs with AVX512_BF16 but no AMX, "
    "whichever a start-up probe times faster (a resumed run keeps its precision); "
    "else float32. The final evaluation and the export compute in float32 whatever "
    "this is.",
)
flags.DEFINE_integer(
    "compilations",
    _DEFAULTS.compilations,
    "Compile the training step this many times at the start and keep the fastest "
    "(a compiled step can be slow for the whole run; speed only; one worker).",
)
flags.DEFINE_integer(
    "verbose",
    None,
    "Keras verbosity: 0 silent, 1 progress bar, 2 one line/epoch; default 1 on a terminal, else 2.",
)

# The attack every preset trains against (AttackConfig's defaults); a flag
# given on the command line replaces the preset's value.
_ATTACK = presets.get(_DEFAULTS.defense).attack
flags.DEFINE_enum("norm", _ATTACK.norm, config_lib.NORMS, "Threat model norm.")
flags.DEFINE_float("epsilon", _ATTACK.epsilon, "Attack radius in [0, 1] pixel units.")
flags.DEFINE_float(
    "step_size",
    _ATTACK.step_size,
    "Attack step size (default: 2.5 * epsilon / attack_steps, "
    f"{_ATTACK.resolved_step_size:g} with the defaults).",
)
flags.DEFINE_integer("attack_steps", _ATTACK.steps, "Attack steps during training.")
flags.DEFINE_bool("random_start", _ATTACK.random_start, "Random start of the PGD attack.")
flags.DEFINE_enum(
    "attack_loss",
    _ATTACK.loss,
    config_lib.ATTACK_LOSSES,
    "Training attack loss (auto: kl for TRADES, ce otherwise).",
)
flags.DEFINE_enum(
    "attack_unroll",
    str(_ATTACK.unroll),
    ("auto", "true", "false"),
    "Trace the training attack's steps one by one instead of as a loop: the same "
    "attack, another speed (auto: unrolled on machines without a GPU).",
)
_ATTACK_FLAGS = {
    "norm": "attack_norm",
    "epsilon": "attack_epsilon",
    "step_size": "attack_step_size",
    "attack_steps": "attack_steps",
    "random_start": "attack_random_start",
    "attack_loss": "attack_loss",
    "attack_unroll": "attack_unroll",
}
# Flag text -> AttackConfig.unroll.
_UNROLL_VALUES = {"auto": "auto", "true": True, "false": False}


def _preset_values(field):
    """`--help` text of a field that the --defense preset sets, e.g. '1 (adr_pgd, ...)'."""
    by_value = {}
    for name in presets.NAMES:
        by_value.setdefault(getattr(presets.get(name), field), []).append(name)
    return "; ".join(
        f"{value:g} ({', '.join(names)})"
        if isinstance(value, float)
        else f"{value} ({', '.join(names)})"
        for value, names in by_value.items()
    )


# One flag per objective weight / ADR hyperparameter; the default is the
# --defense preset's value, which --help lists.
for _name in config_lib.FLOAT_FIELDS:
    flags.DEFINE_float(
        _name, None, f"ADRConfig.{_name}; default from --defense: {_preset_values(_name)}."
    )
flags.DEFINE_integer(
    "propagation_neighbors",
    None,
    "k of the label-propagation k-NN graph; "
    f"default from --defense: {_preset_values('propagation_neighbors')}.",
)
flags.DEFINE_enum(
    "compactness_distance",
    None,
    config_lib.DISTANCES,
    "Local compactness distance; default from --defense: "
    f"{_preset_values('compactness_distance')}.",
)
flags.DEFINE_enum(
    "latent_normalization",
    None,
    config_lib.LATENT_NORMALIZATIONS,
    "Compactness on RMS-normalised codes (rms, bounded) or raw codes (none, the "
    f"paper's); default from --defense: {_preset_values('latent_normalization')}.",
)
flags.DEFINE_enum(
    "smoothness_push",
    None,
    config_lib.SMOOTHNESS_PUSHES,
    "Different-label global smoothness: overlap (bounded) or cross_entropy (the "
    f"paper's); default from --defense: {_preset_values('smoothness_push')}.",
)
flags.DEFINE_enum(
    "pairwise_scope",
    None,
    config_lib.PAIRWISE_SCOPES,
    "global: pairwise terms over the global batch; replica: per replica; default "
    f"from --defense: {_preset_values('pairwise_scope')}.",
)


def adr_config_from_flags():
    """The --defense preset with the flags given on the command line applied."""
    overrides = {
        field: FLAGS[flag].value for flag, field in _ATTACK_FLAGS.items() if FLAGS[flag].present
    }
    if "attack_unroll" in overrides:
        overrides["attack_unroll"] = _UNROLL_VALUES[overrides["attack_unroll"]]
    for name in config_lib.FLOAT_FIELDS + (
        "propagation_neighbors",
        "compactness_distance",
        "latent_normalization",
        "smoothness_push",
        "pairwise_scope",
    ):
        if FLAGS[name].value is not None:
            overrides[name] = FLAGS[name].value
    return presets.get(FLAGS.defense, **overrides)


def _fractions(values):
    try:
        return tuple(float(f) for f in values)
    except ValueError:
        raise ValueError(
            f"--lr_decay_fractions must be numbers in (0, 1), e.g. 0.5,0.75; got "
            f"{','.join(values)}."
        ) from None


def format_summary(metrics):
    """A few readable lines about a finished run."""
    evaluation_results = metrics["evaluation"]
    lines = [
        f"dataset={metrics['dataset']} train_examples={metrics['train_examples']} "
        f"epochs={metrics['epochs_run']} train={metrics['train_seconds']:.0f}s "
        f"eval={metrics['eval_seconds']:.0f}s",
        f"clean accuracy:  {metrics['clean_accuracy']:.2%}",
    ]
    # Runs from before the cascade attacked every example with every attack.
    after = not evaluation_results.get("standalone_attacks", True)
    for name, accuracy in evaluation_results.get("attack_accuracy", {}).items():
        label = f"after {name}:" if after else f"{name} accuracy:"
        lines.append(f"{label:17s}{accuracy:.2%}")
    lines.append(
        f"robust accuracy: {metrics['robust_accuracy']:.2%} (worst case per example "
        "over the attacks above)"
    )
    if "export_path" in metrics:
        lines.append(f"exported to {metrics['export_path']}")
    return "\n".join(lines)


def options_from_flags():
    return pipeline.TrainOptions(
        dataset=FLAGS.dataset,
        model=FLAGS.model,
        defense=FLAGS.defense,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        lr_decay_fractions=_fractions(FLAGS.lr_decay_fractions),
        weight_decay=FLAGS.weight_decay,
        ema_momentum=FLAGS.ema_momentum,
        seed=FLAGS.seed,
        train_examples=FLAGS.train_examples,
        validation_examples=FLAGS.validation_examples,
        validation_epsilon=FLAGS.validation_epsilon,
        test_examples=FLAGS.test_examples,
        eval_attacks=tuple(FLAGS.eval_attacks),
        output_dir=FLAGS.output_dir,
        data_dir=FLAGS.data_dir,
        strategy=FLAGS.strategy,
        sync_batchnorm=FLAGS.sync_batchnorm,
        export=FLAGS.export,
        export_weights=FLAGS.export_weights,
        divergence_factor=FLAGS.divergence_factor,
        precision=FLAGS.precision,
        compilations=FLAGS.compilations,
        deterministic=FLAGS.deterministic,
        verbose=cli.keras_verbosity(FLAGS.verbose),
        command=" ".join(shlex.quote(a) for a in ["adr-train", *sys.argv[1:]]),
    )


def _run_bytes():
    """About what a run writes: six float32 copies of the weights (best.keras,
    final.keras, the backup with Adam's two slots, the export)."""
    info = data.info(FLAGS.dataset)
    model = models.get(FLAGS.model, input_shape=info.input_shape, num_classes=info.num_classes)
    return 6 * 4 * model.count_params()


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
        # Printed once, not also logged: absl would repeat it on stderr.
        sys.exit(f"adr-train: error: {error}")
    except KeyboardInterrupt:
        print(f"adr-train: interrupted; {cli.resume_hint(FLAGS.output_dir)}", file=sys.stderr)
        sys.exit(130)
    except (OSError, tf.errors.OpError) as error:
        if not cli.is_disk_full(error):
            raise
        message = cli.disk_full_message(error, FLAGS.output_dir, _run_bytes())
        sys.exit(f"adr-train: error: {message}")
    print(format_summary(metrics))


def run():
    cli.run_program(main, __name__)


if __name__ == "__main__":
    run()
