"""What a run is built from: its data splits (checked first), model, optimizer and precision."""

import keras
from absl import logging

from keras_adr import data, distribute, models, precision, rundir
from keras_adr.adr_model import ADRModel


def build_model(options, adr_config, dataset_info, train_split=None):
    """The ADRModel of `options.model` for the dataset's input shape and classes.

    A `Standardize` layer in the architecture is adapted to the per-channel
    statistics of `train_split` (un-augmented).
    """
    kwargs = dict(input_shape=dataset_info.input_shape, num_classes=dataset_info.num_classes)
    if options.model in ("resnet18", "wide_resnet"):
        kwargs["sync_batchnorm"] = options.sync_batchnorm
    backbone = models.get(options.model, **kwargs)
    names = {layer.name for layer in backbone.layers}
    if train_split is not None and models.STANDARDIZE_LAYER in names:
        backbone.get_layer(models.STANDARDIZE_LAYER).adapt(
            data.load(options.dataset, train_split, batch_size=1000, data_dir=options.data_dir)
        )
    return ADRModel(backbone, adr_config)


def build_optimizer(options, steps_per_epoch):
    """`options.optimizer` with the piecewise-constant schedule of `options`."""
    total_steps = options.epochs * steps_per_epoch
    boundaries = [max(1, int(f * total_steps)) for f in options.lr_decay_fractions]
    values = [options.learning_rate * 0.1**i for i in range(len(boundaries) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    common = dict(weight_decay=options.weight_decay or None)
    if options.ema_momentum:
        common.update(use_ema=True, ema_momentum=options.ema_momentum)
    if options.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, **common)
    return keras.optimizers.Adam(schedule, **common)


def splits(options, dataset_info):
    """Training and validation split strings: validation = the last examples of train."""
    train_size = options.train_examples or dataset_info.num_train
    if train_size > dataset_info.num_train:
        logging.warning(
            "--train_examples=%d is more than the %d training examples of %s; using all %d.",
            train_size,
            dataset_info.num_train,
            options.dataset,
            dataset_info.num_train,
        )
        train_size = dataset_info.num_train
    held_out = options.validation_examples
    if held_out >= train_size:
        raise ValueError(
            f"`validation_examples` ({held_out}) must be smaller than the "
            f"training examples ({train_size})."
        )
    train_split = f"train[:{train_size - held_out}]"
    validation_split = f"train[{train_size - held_out}:{train_size}]" if held_out else None
    return train_split, validation_split, train_size - held_out


def check_splits(options, info, train_split, evaluate):
    """Fails before training if a split the run uses is missing or of another image shape.

    Reads the first example of the training split and, if the evaluation is
    still to run, of the test split (un-augmented: augmentation may leave
    shapes unknown).

    Raises:
        keras_adr.data.DatasetNotFoundError: If a split is missing.
        ValueError: If a split's images do not have the dataset's shape.
    """
    expected = tuple(info.input_shape)
    for split in (train_split, "test") if evaluate else (train_split,):
        first = data.load(options.dataset, split, batch_size=1, data_dir=options.data_dir, take=1)
        shape = tuple(first.element_spec[0].shape[1:])
        if shape != expected:
            raise ValueError(
                f"The {split.split('[')[0]} images of {options.dataset!r} have shape {shape}, "
                f"but {options.dataset} images are {expected}: give a --data_dir whose train "
                "and test files both hold them."
            )


def training_policy(options, strategy, out):
    """`(policy, reason)`: the dtype policy this run trains in, and why (for the log).

    `--precision=auto` may ask a start-up probe (CPUs with AVX512_BF16 and no
    AMX), whose answer can differ between processes. So a run directory that
    already holds a run keeps the policy it recorded (a resumed run is not
    mixed), and the workers of a multi-worker run do not probe (they would
    not agree): they take what the CPU alone decides.
    """
    if options.precision != "auto":
        return precision.resolve(options.precision), f"--precision={options.precision}"
    stored = rundir.stored_config(out)
    if stored is not None:
        # `_run_config` leaves float32 unrecorded.
        policy = stored.get("options", {}).get("precision", "float32")
        return policy, "--precision=auto: what this run directory's run trained in"
    single = distribute.num_workers(strategy) == 1
    policy, why = precision.auto_choice(
        probe=precision.process_bfloat16_speedup if single else None
    )
    return policy, f"--precision=auto: {why}"
