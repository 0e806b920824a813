"""The ADR training step: `ADRMixin` for any Keras model, `ADRModel` as a wrapper.

One step: craft adversarial examples with the configured attack (model in
inference mode), run one training-mode forward pass on the clean and one on
the adversarial batch returning `(logits, z)`, add the base objective and the
weighted ADR terms, and apply the gradients with the compiled optimizer.

Losses are summed over the replica's examples and divided by the *global*
batch size, so gradients (summed across replicas by the optimizer) do not
depend on the number of replicas. With `pairwise_scope="global"` the pairwise
terms compare each adversarial example with the clean examples of the whole
global batch (gathered across replicas), so R replicas compute exactly what
one device would.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_adr import _keras_compat, attacks, graph
from keras_adr import objective as adr_objective
from keras_adr.config import ADRConfig
from keras_adr.layers import Latent
from keras_adr.models import LATENT_LAYER

# Reported by the train step besides the loss terms: mean L2 norms of the clean
# latent codes and logits.
DIAGNOSTICS = ("latent_norm", "logits_norm")


def _as_config(config):
    if config is None:
        return ADRConfig()
    if isinstance(config, dict):
        return ADRConfig.from_config(config)
    if not isinstance(config, ADRConfig):
        raise ValueError(
            f"`adr_config` must be an ADRConfig (see keras_adr.presets.get) or its dict; "
            f"got {type(config).__name__}."
        )
    return config


def _unpack(data):
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise ValueError(
        "ADR training expects batches of (images, integer_labels); got "
        f"{type(data).__name__} of length {len(data) if isinstance(data, (tuple, list)) else 1}. "
        "Sample weights are not supported."
    )


def _num_images(x):
    """The batch size of `x`: an int if static, else a scalar tensor."""
    return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def checked_labels(y, num_classes=None, num_images=None):
    """`[B]` int32 labels, with run-time checks that they are class indices.

    Fails (also inside `tf.function`) on fractional float labels, negative
    labels and, when `num_classes` is known, labels >= `num_classes`: such
    labels would otherwise surface as an error deep inside a loss term (or
    be truncated silently by a cast), and on one-hot rows: statically for
    `[B, K]` labels, at run time for more labels than `num_images`.
    """
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] is not None and y.shape[-1] > 1:
        # Flattened, one-hot rows would fail later as "labels.shape=(640,)".
        raise ValueError(
            f"ADR training: labels must be class indices; got one-hot rows of shape "
            f"{tuple(y.shape)} (use argmax, e.g. y.argmax(-1))."
        )
    y = tf.reshape(y, [-1])
    what = "ADR training needs integer class labels in [0, num_classes)"
    checks = []
    if y.dtype.is_floating:
        checks.append(
            tf.debugging.assert_equal(y, tf.round(y), message=f"{what}; got fractional labels")
        )
    elif not y.dtype.is_integer:
        raise ValueError(f"{what}; got labels of dtype {y.dtype.name}.")
    labels = tf.cast(y, tf.int32)
    checks.append(tf.debugging.assert_non_negative(labels, message=f"{what}; got a negative label"))
    one_per_image = (
        "ADR training: labels must be class indices, one per image (flattened one-hot rows: "
        "use argmax; an unbatched tf.data.Dataset: call .batch())"
    )
    if isinstance(num_images, int) and labels.shape[0] is not None:
        if labels.shape[0] != num_images:
            raise ValueError(
                f"{one_per_image}; got {labels.shape[0]} labels for {num_images} images."
            )
    elif num_images is not None:
        checks.append(
            tf.debugging.assert_equal(
                tf.size(labels), tf.cast(num_images, tf.int32), message=one_per_image
            )
        )
    if num_classes:
        checks.append(
            tf.debugging.assert_less(
                labels,
                tf.constant(num_classes, tf.int32),
                message=f"{what} with num_classes={num_classes}; got a label >= {num_classes}",
            )
        )
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def unrolls_training_attack(attack=None):
    """Whether the training attack is traced step by step (`pgd(unroll=True)`).

    `attack.unroll` (an `AttackConfig`) when it is a bool. Else (`"auto"`, the
    default, or no `attack`), on CPUs only (no GPU visible): TensorFlow's oneDNN graph rewrite left
    the max-pool gradients inside the attack's `tf.while_loop` on
    TensorFlow's own kernel in about one compilation in eight, a 1.3-1.5x
    slower bfloat16 step for the whole run, and never once unrolled
    (docs/mixed-precision.md, "Slow compilations"). On GPUs the loop compiles faster.
    """
    if attack is not None and isinstance(attack.unroll, bool):
        return attack.unroll
    return not tf.config.list_logical_devices("GPU")


class ADRMixin:
    """Adds the ADR `train_step` / `test_step` to a `keras.Model` subclass.

    The model's `call(x, training=False, return_latent=False)` must return
    the logits, or `(logits, z)` when `return_latent=True`. Mix in before
    `keras.Model` and pass `adr_config=` through the constructor:

    ```python
    class MyModel(keras_adr.ADRMixin, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.features = ...
            self.classifier = keras.layers.Dense(10)

        def call(self, x, training=False, return_latent=False):
            z = self.features(x, training=training)
            logits = self.classifier(z)
            return (logits, z) if return_latent else logits

    model = MyModel(adr_config=keras_adr.presets.get("adr_pgd"))
    ```

    Reported metrics: `loss`, `accuracy` (clean), `adv_accuracy`, the
    unweighted batch mean of every enabled term (`ce`, `adv_ce` or
    `trades_kl`, `local_compactness`, ...), the `DIAGNOSTICS`, and the
    metrics given to `compile(metrics=..., weighted_metrics=...)`, each on
    the clean predictions under its own name and on the adversarial ones
    under `adv_<name>`. `compile` takes no `loss`: the objective comes from
    the `ADRConfig`.

    `val_loss` is the same quantity as `loss`: `test_step` computes the
    whole ADR objective on the validation batch (inference mode, no update),
    so `EarlyStopping(monitor="val_loss")` and `ReduceLROnPlateau` watch the
    training objective on held-out data; `val_ce` is the clean
    cross-entropy alone.
    """

    _validation_epsilon = None

    @property
    def validation_epsilon(self):
        """Epsilon of `test_step`'s attack (None: the training attack's).

        A run option, not saved with the model: e.g. the test threat model,
        so that runs trained at different epsilons select checkpoints alike.
        Setting it retraces the compiled test step.
        """
        return self._validation_epsilon

    @validation_epsilon.setter
    def validation_epsilon(self, value):
        if value is not None and not value > 0:
            raise ValueError(f"`validation_epsilon` must be > 0 or None; got {value}.")
        self._validation_epsilon = None if value is None else float(value)
        self.test_function = None  # traced with the old value

    def __init__(self, *args, adr_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_adr(adr_config)

    def _init_adr(self, adr_config):
        config = _as_config(adr_config)
        self.adr_config = config
        self._term_weights = self._objective_weights(config)
        self._adr_loss_tracker = keras.metrics.Mean(name="loss")
        self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        self._term_trackers = [keras.metrics.Mean(name=name) for name in self._term_weights]
        # Scale diagnostics of the clean batch: a runaway objective shows as
        # growing latent codes or logits before accuracy falls.
        self._norm_trackers = [keras.metrics.Mean(name=name) for name in DIAGNOSTICS]
        # The compiled metrics on the adversarial predictions (see `compile`).
        self._adv_compile_metrics = None
        # With the optimizer's step, the seed of the step's random choices (the
        # attack's start, the sampled features): the same for the same
        # `keras.utils.set_random_seed`, and a function of the step alone, so
        # that a resumed run repeats an uninterrupted one.
        self._step_salt = int(np.random.randint(2**31 - 1))

    @staticmethod
    def _objective_weights(config):
        """Ordered `{term name: weight}` of every term in the total loss."""
        if config.objective == "standard":
            weights = {"ce": 1.0}
        elif config.objective == "pgd":
            weights = {"ce": config.natural_weight, "adv_ce": config.adversarial_weight}
        else:
            weights = {"ce": 1.0, "trades_kl": config.trades_beta}
        weights.update({name: getattr(config, name) for name in config.enabled_terms})
        return weights

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        metrics=None,
        weighted_metrics=None,
        loss_weights=None,
        **kwargs,
    ):
        """Compiles with an optimizer and metrics; the objective comes from `ADRConfig`.

        Args:
            optimizer: As for `keras.Model.compile`.
            loss: Must be None: the objective is the `ADRConfig`'s.
            metrics: Metrics of `(labels, logits)` as for `keras.Model.compile`
                (names, functions or `keras.metrics.Metric` objects). Each is
                updated on the clean predictions under its name and, as a copy
                (`from_config(get_config())`), on the adversarial predictions
                under `adv_<name>`, in `fit` and `evaluate`.
            weighted_metrics: The same (ADR batches carry no sample weights,
                so they equal `metrics`).
            loss_weights: Must be None.
            **kwargs: Passed to `keras.Model.compile` (`run_eagerly`,
                `steps_per_execution`, `jit_compile`, ...).

        Raises:
            ValueError: If `loss` or `loss_weights` is given (the ADR step would
                ignore them), or a metric object cannot be copied.
        """
        given = {name for name, value in (("loss", loss), ("loss_weights", loss_weights)) if value}
        if given:
            raise ValueError(
                f"{type(self).__name__}.compile() takes no {sorted(given)}: the ADR objective "
                "comes from the ADRConfig, so they would be ignored. Change the objective with "
                "keras_adr.presets.get(...)."
            )
        super().compile(
            optimizer=optimizer, metrics=metrics, weighted_metrics=weighted_metrics, **kwargs
        )
        self._adv_compile_metrics = None
        if metrics is not None or weighted_metrics is not None:
            # A second container of the same kind (Keras' `CompileMetrics`,
            # which resolves names like "accuracy" from the shapes) over fresh
            # copies, so that the adversarial updates do not mix with the clean.
            self._adv_compile_metrics = type(_keras_compat.compile_metrics(self))(
                _copied_metrics(metrics), _copied_metrics(weighted_metrics)
            )

    def compile_from_config(self, config):
        # Keras skips compiling on load when `compile` is overridden; this is
        # its own restore path, through the checks above.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return [
            self._adr_loss_tracker,
            self._accuracy,
            self._adv_accuracy,
            *self._term_trackers,
            *self._norm_trackers,
            *self._compiled_metrics(),
        ]

    def _compiled_metrics(self):
        """The containers of the user's compiled metrics: clean, then adversarial."""
        clean = _keras_compat.compile_metrics(self) if self.compiled else None
        return [m for m in (clean, self._adv_compile_metrics) if m is not None]

    def compute_metrics(self, x, y, y_pred, sample_weight=None, y_pred_adv=None):
        """Updates the compiled metrics on `y_pred` and, under `adv_` names, on `y_pred_adv`.

        Args:
            x: The images (unused, as in `keras.Model.compute_metrics`).
            y: Integer labels.
            y_pred: Clean logits.
            sample_weight: Unused by the ADR steps (always None).
            y_pred_adv: Adversarial logits, or None (no `adv_` update).

        Returns:
            `get_metrics_result()`.
        """
        adversarial = self._adv_compile_metrics
        if adversarial is not None:
            if y_pred_adv is not None:
                adversarial.update_state(y, y_pred_adv, sample_weight)
            elif not adversarial.built:
                # Keras builds the compiled metrics before the first step
                # (symbolically, in the strategy's scope): the copies with them.
                adversarial.build(y, y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_metrics_result(self):
        results = {}
        compiled = self._compiled_metrics()
        for metric in self.metrics:
            if any(metric is c for c in compiled) and not metric.built:
                continue  # the compiled metrics before Keras builds them
            value = metric.result()
            if metric is self._adv_compile_metrics:
                value = {f"adv_{name}": v for name, v in value.items()}
            if isinstance(value, dict):
                results.update(value)
            else:
                results[metric.name] = value
        return results

    def _num_classes(self):
        """The number of classes if known before the first call, else None."""
        return None

    def _forward(self, x, training):
        outputs = self(x, training=training, return_latent=True)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError(
                f"{type(self).__name__}.call(x, return_latent=True) must return (logits, z); "
                f"got {type(outputs).__name__}."
            )
        return outputs

    def clean_and_adversarial_outputs(self, x, x_adv, training=True):
        """The forward passes of one step: `((logits, z), (logits_adv, z_adv))`.

        The default runs `call(..., return_latent=True)` once on `x` and once
        on `x_adv` (so BatchNorm sees each batch on its own, as in the
        paper). Override it to run the passes differently, e.g. one pass over
        `concat([x, x_adv])` for a model without batch-coupled layers.

        Args:
            x: Clean images.
            x_adv: Adversarial images, or None (the `standard` objective).
            training: Mode of the forward passes.

        Returns:
            `((logits, z), (logits_adv, z_adv))`; the second pair is
            `(None, None)` when `x_adv` is None.
        """
        clean = self._forward(x, training)
        adversarial = self._forward(x_adv, training) if x_adv is not None else (None, None)
        return clean, adversarial

    def adversarial_examples(self, x, y, loss=None, epsilon=None, seed=None):
        """Adversarial examples of `(x, y)` under the configured attack.

        Args:
            x: Images in the attack's pixel range.
            y: Integer labels.
            loss: Attack loss; defaults to the objective's (`"kl"` for TRADES).
            epsilon: Radius; defaults to the configured one. Another radius
                keeps the configured step size relative to it.
            seed: Seed of the random start (see `attacks.pgd`); None: the
                stateful generator. `train_step` passes one derived from the
                optimizer's step and the replica.

        Returns:
            Stop-gradient adversarial images.
        """
        attack = self.adr_config.attack
        epsilon = attack.epsilon if epsilon is None else epsilon
        return attacks.pgd(
            lambda images: self(images, training=False),
            x,
            y,
            epsilon=epsilon,
            step_size=attack.resolved_step_size * epsilon / attack.epsilon,
            steps=attack.steps,
            norm=attack.norm,
            random_start=attack.random_start,
            loss=loss or self.adr_config.attack_loss,
            clip_min=attack.clip_min,
            clip_max=attack.clip_max,
            unroll=unrolls_training_attack(attack),
            seed=seed,
        )

    def _reference(self, batch):
        """The `Reference` of the pairwise terms: the global batch, or None (the batch).

        With `pairwise_scope="global"` under several replicas, the clean
        labels, codes and logits (and, for label propagation, the adversarial
        codes) of every replica are gathered once here, stop-gradient.
        """
        context = tf.distribute.get_replica_context()
        if (
            self.adr_config.pairwise_scope != "global"
            or context is None
            or context.num_replicas_in_sync == 1
            or not any(name in adr_objective.PAIRWISE_TERMS for name in self._term_weights)
        ):
            return None
        gather = lambda t: context.all_gather(tf.stop_gradient(t), axis=0)
        reference = adr_objective.Reference(
            labels=gather(batch.labels), z=gather(batch.z), logits=gather(batch.logits)
        )
        if "label_propagation" not in self._term_weights:
            return reference
        # Only the propagation graph needs the adversarial codes and where this
        # replica's rows sit in it: two collectives the other terms skip.
        sizes = context.all_gather(tf.shape(batch.labels)[:1], axis=0)
        return reference._replace(
            z_adv=gather(batch.z_adv),
            offset=tf.reduce_sum(sizes[: context.replica_id_in_sync_group]),
        )

    def _term_sums(self, batch):
        """`{name: sum over this replica's examples}` of every term of the loss."""
        batch = batch._replace(reference=self._reference(batch))
        return {
            name: tf.reduce_sum(adr_objective.TERMS[name](batch, self.adr_config))
            for name in self._term_weights
        }

    def _step_seed(self):
        """`[2]` int64 seed of this step's random choices: the same on every replica.

        The optimizer's step counter (0 before `compile`) and a salt drawn when
        the model was built, so that runs of other seeds sample otherwise.
        """
        optimizer = getattr(self, "optimizer", None)
        step = tf.cast(optimizer.iterations, tf.int64) if optimizer is not None else 0
        return tf.stack([tf.constant(self._step_salt, tf.int64), step])

    def _attack_seed(self, validation=False):
        """`[2]` int64 seed of this step's attack: its own on every replica.

        Validation attacks every batch after a training step with the same
        seed (another one than training's): a random start is still uniform
        for every example, and validation repeats exactly after a resume.
        """
        context = tf.distribute.get_replica_context()
        replica = tf.cast(context.replica_id_in_sync_group if context is not None else 0, tf.int64)
        return tf.random.fold_in(self._step_seed(), -(replica + 1) if validation else replica + 1)

    def _global_batch_size(self, local_batch_size):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return local_batch_size
        return context.all_reduce(tf.distribute.ReduceOp.SUM, local_batch_size)

    def compute_adr_loss(self, x, y, x_adv=None, training=True):
        """The ADR objective of one batch, as `train_step` computes it.

        Args:
            x: Clean images.
            y: Integer labels.
            x_adv: Adversarial images (required unless the objective is
                `"standard"`), e.g. from `adversarial_examples`.
            training: Mode of the forward passes.

        Returns:
            `(loss, reported_loss, sums, outputs)`: the loss to differentiate
            on this replica (sums divided by the global batch size, plus its
            share of regularisation), the loss per example of this replica
            (what the `loss` metric reports), `{term: sum over examples}`
            (plus the `DIAGNOSTICS`, sums of the clean codes' and logits' L2
            norms), and `(logits, logits_adv)`.
        """
        if self.adr_config.uses_adversary and x_adv is None:
            raise ValueError(f"objective={self.adr_config.objective!r} needs `x_adv`.")
        (logits, z), (logits_adv, z_adv) = self.clean_and_adversarial_outputs(
            x, x_adv, training=training
        )
        batch = adr_objective.ADRBatch(
            labels=tf.cast(tf.reshape(y, [-1]), tf.int32),
            logits=logits,
            z=z,
            logits_adv=logits_adv,
            z_adv=z_adv,
            seed=self._step_seed() if self.adr_config.samples_features else None,
        )
        sums = self._term_sums(batch)
        norm_sum = lambda t: tf.reduce_sum(
            tf.norm(tf.stop_gradient(graph.flatten_batch(t)), axis=1)
        )
        sums.update(latent_norm=norm_sum(z), logits_norm=norm_sum(logits))
        objective = tf.add_n([w * sums[name] for name, w in self._term_weights.items()])
        local_batch = tf.cast(tf.shape(x)[0], tf.float32)
        loss = objective / self._global_batch_size(local_batch)
        reported_loss = objective / local_batch
        if self.losses:
            # Regularisers are per model, not per example: each replica adds
            # its share so that the summed gradient counts them once.
            regularization = tf.add_n(self.losses)
            num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss += regularization / num_replicas
            reported_loss += regularization
        return loss, reported_loss, sums, (logits, logits_adv)

    def train_step(self, data):
        x, y = _unpack(data)
        y = checked_labels(y, self._num_classes(), _num_images(x))
        uses_adversary = self.adr_config.uses_adversary
        x_adv = (
            self.adversarial_examples(x, y, seed=self._attack_seed()) if uses_adversary else None
        )
        with tf.GradientTape() as tape:
            loss, reported_loss, sums, (logits, logits_adv) = self.compute_adr_loss(x, y, x_adv)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)

        self._update_metrics(x, y, reported_loss, sums, logits, logits_adv)
        return self._results(adversarial=uses_adversary)

    def test_step(self, data):
        """The ADR objective and the metrics of `train_step`, on a validation batch.

        `loss` (`val_loss` in `fit`) is the whole objective, as in
        `train_step` but in inference mode and without an update, so it is
        the same quantity as the training `loss`; every term (`ce` is the
        clean cross-entropy), `accuracy`, `adv_accuracy` and the compiled
        metrics are reported too. The validation attack maximises
        cross-entropy (also for TRADES), the usual measure of robust
        accuracy, at `validation_epsilon` if set (else the training
        attack's epsilon); with TRADES the objective's KL term is taken at
        those examples (one attack per batch, not also the KL attack).
        """
        x, y = _unpack(data)
        y = checked_labels(y, self._num_classes(), _num_images(x))
        x_adv = self.adversarial_examples(
            x,
            y,
            loss="ce",
            epsilon=self.validation_epsilon,
            seed=self._attack_seed(validation=True),
        )
        uses_adversary = self.adr_config.uses_adversary
        _, reported_loss, sums, (logits, logits_adv) = self.compute_adr_loss(
            x, y, x_adv if uses_adversary else None, training=False
        )
        if not uses_adversary:
            logits_adv = self(x_adv, training=False)
        self._update_metrics(x, y, reported_loss, sums, logits, logits_adv)
        return self._results(adversarial=True)

    def _update_metrics(self, x, y, reported_loss, sums, logits, logits_adv):
        """Updates every reported metric with one batch (`logits_adv` may be None)."""
        y = tf.cast(tf.reshape(y, [-1]), tf.int32)
        local_batch = tf.cast(tf.shape(x)[0], tf.float32)
        self._adr_loss_tracker.update_state(reported_loss, sample_weight=local_batch)
        for tracker in self._term_trackers + self._norm_trackers:
            tracker.update_state(sums[tracker.name] / local_batch, sample_weight=local_batch)
        self._accuracy.update_state(y, logits)
        if logits_adv is not None:
            self._adv_accuracy.update_state(y, logits_adv)
        self.compute_metrics(x, y, logits, y_pred_adv=logits_adv)

    def _results(self, adversarial):
        results = self.get_metrics_result()
        if not adversarial:
            # No adversarial predictions (the `standard` objective's training).
            adv_names = {"adv_accuracy"}
            if self._adv_compile_metrics is not None and self._adv_compile_metrics.built:
                adv_names |= {f"adv_{name}" for name in self._adv_compile_metrics.result()}
            results = {k: v for k, v in results.items() if k not in adv_names}
        return results

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; raises if no training step ran (no training data).

        Raises:
            ValueError: If an epoch ran on 0 examples (an empty dataset or
                arrays); a resumed fit with no epochs left is not an error.
        """
        history = super().fit(*args, **kwargs)
        if history.epoch and not history.history:
            raise ValueError(
                f"fit ran {len(history.epoch)} epoch(s) without a training step: the training "
                "data holds 0 examples. Check the dataset (or its take/filter/split)."
            )
        return history

    def get_config(self):
        return {**super().get_config(), "adr_config": self.adr_config.get_config()}


def _copied_metrics(metrics):
    """`metrics` (as given to `compile`) with every `keras.metrics.Metric` a fresh copy."""
    if metrics is None:
        return None
    if isinstance(metrics, dict):
        return {key: _copied_metrics(value) for key, value in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [_copied_metrics(metric) for metric in metrics]
    if not isinstance(metrics, keras.metrics.Metric):
        return metrics  # a name or a function: Keras makes a new metric of it
    try:
        return type(metrics).from_config(metrics.get_config())
    except Exception as error:
        raise ValueError(
            f"compile(metrics=...): the metric {metrics.name!r} cannot be copied for its "
            f"adv_{metrics.name} version ({type(error).__name__}: {error}); give "
            f"{type(metrics).__name__} a get_config() that returns its constructor arguments."
        ) from None


def _latent_layer(backbone, name):
    """The layer of `backbone` whose output is `z`: by `name`, else the one `Latent` layer."""
    if name is None:
        marked = [layer for layer in backbone.layers if isinstance(layer, Latent)]
        if len(marked) == 1:
            return marked[0]
        if len(marked) > 1:
            raise ValueError(
                f"The backbone has {len(marked)} Latent layers "
                f"({[layer.name for layer in marked]}); keep one, or pass "
                "latent_layer=<the name of the one to use>."
            )
        name = LATENT_LAYER  # Models built before the Latent layer existed.
    try:
        return backbone.get_layer(name)
    except ValueError:
        names = [layer.name for layer in backbone.layers]
        raise ValueError(
            f"The backbone has no keras_adr.layers.Latent layer and no layer named {name!r} to "
            f"use as the latent code; its layers are: {names}. Add a Latent layer after the "
            "features, or pass latent_layer=<one of them>."
        ) from None


# A probe row counts as probabilities within this tolerance: bfloat16 rounds
# a softmax's sum by up to about 2**-8 per term.
_PROBABILITY_TOLERANCE = 2e-2


def _check_logits(backbone, allow_probabilities):
    """Raises (or warns) if `backbone` outputs probabilities rather than logits.

    The outputs are checked, not the last layer's `activation`, so that a
    `Softmax` layer, a softmax `Dense`/`Activation` or a normalising `Lambda`
    are all found: on a probe batch of two images in [0, 1] (zeros and
    uniform noise), rows all in [0, 1] that sum to 1 are probabilities. Where
    the probe cannot run eagerly (inside a `tf.function`) or the input shape
    has unknown dimensions, only a softmax activation of the last layer is
    checked.
    """
    last = backbone.layers[-1].name
    shape = tuple(backbone.inputs[0].shape[1:])
    if tf.executing_eagerly() and all(d is not None for d in shape):
        rng = np.random.default_rng(0)
        probe = np.stack([np.zeros(shape), rng.uniform(0.0, 1.0, shape)]).astype(np.float32)
        outputs = tf.cast(backbone(probe, training=False), tf.float32).numpy()
        probabilities = (
            outputs.ndim == 2
            and outputs.shape[-1] > 1
            and outputs.min() >= -_PROBABILITY_TOLERANCE
            and outputs.max() <= 1 + _PROBABILITY_TOLERANCE
            and np.allclose(outputs.sum(-1), 1.0, atol=_PROBABILITY_TOLERANCE)
        )
    else:
        layer = backbone.layers[-1]
        probabilities = isinstance(layer, keras.layers.Softmax) or (
            getattr(layer, "activation", None) is keras.activations.softmax
        )
    if not probabilities:
        return
    message = (
        f"The backbone outputs probabilities (rows in [0, 1] that sum to 1; last layer "
        f"{last!r}), but ADR and the attacks need logits: remove the softmax from {last!r} "
        "(use from_logits=True losses elsewhere), or pass allow_probabilities=True if the "
        "outputs are logits that only look like probabilities."
    )
    if not allow_probabilities:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


@keras.saving.register_keras_serializable(package="keras_adr")
class ADRModel(ADRMixin, keras.Model):
    """Wraps a functional classifier that outputs logits for ADR training.

    `call(x)` returns the backbone's logits, so `predict`, `evaluate`-style
    use and export behave like the backbone; `fit` runs the ADR step.

    Args:
        backbone: A functional `keras.Model` from images in [0, 1] to logits.
        adr_config: An `ADRConfig` (default: `ADRConfig()`, ADR on PGD-AT).
        latent_layer: Name of the layer whose output is the latent code `z`.
            Default: the backbone's one `keras_adr.layers.Latent` layer, or
            for models built without one, the layer named `"latent"`.
        allow_probabilities: Accept a backbone whose outputs look like
            probabilities (with a warning) instead of raising. ADR's losses
            and the attacks treat the outputs as logits, so this is only for
            a backbone known to output logits that sum to 1.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Raises:
        ValueError: If `backbone` is not a functional model with one output,
            has several `Latent` layers, or has neither a `Latent` layer nor a
            layer named `latent_layer` (the messages list the candidates); or
            if its outputs are probabilities (see `_check_logits`) and
            `allow_probabilities` is False.
    """

    def __init__(
        self, backbone, adr_config=None, latent_layer=None, allow_probabilities=False, **kwargs
    ):
        super().__init__(adr_config=adr_config, **kwargs)
        if isinstance(backbone, keras.Sequential) and getattr(backbone, "outputs", None) is None:
            raise ValueError(
                "`backbone` is a keras.Sequential without an input shape: start it with "
                "keras.Input(shape=...) (or call backbone.build((None, *image_shape))), so that "
                "its layers are connected; a functional keras.Model(inputs, logits) works too."
            )
        if (
            not isinstance(backbone, keras.Model)
            or not hasattr(backbone, "outputs")
            or (backbone.outputs is None)
        ):
            raise ValueError(
                "`backbone` must be a keras.Model built on keras.Input (functional, or a "
                "Sequential starting with keras.Input) that outputs logits; got "
                f"{type(backbone).__name__}. For subclassed models use ADRMixin instead."
            )
        if len(backbone.outputs) != 1:
            raise ValueError(
                f"`backbone` must have one output (the logits); it has {len(backbone.outputs)}."
            )
        latent = _latent_layer(backbone, latent_layer)
        _check_logits(backbone, allow_probabilities)
        self.allow_probabilities = bool(allow_probabilities)
        self.backbone = backbone
        self.latent_layer = latent.name
        # Shares the backbone's layers; kept out of Keras' attribute tracking
        # so that the weights are saved once, under `backbone`.
        object.__setattr__(
            self,
            "_logits_and_latent",
            keras.Model(backbone.inputs, [backbone.outputs[0], latent.output]),
        )
        # The backbone's weights exist already: the wrapper is built (needed by
        # callbacks such as BackupAndRestore before the first batch).
        self.built = True

    def _num_classes(self):
        return self.backbone.outputs[0].shape[-1]

    def call(self, x, training=False, return_latent=False):
        if return_latent:
            logits, z = self._logits_and_latent(x, training=training)
            return logits, z
        return self.backbone(x, training=training)

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "adr_config": self.adr_config.get_config(),
            "latent_layer": self.latent_layer,
            "allow_probabilities": self.allow_probabilities,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(
            config.pop("backbone"), custom_objects=custom_objects
        )
        return cls(backbone=backbone, **config)
