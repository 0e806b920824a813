"""The ADR training step: `ADRMixin` for any Keras model (`keras_adr.adr_model.ADRModel` wraps one).

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

import keras
import numpy as np
import tensorflow as tf

from keras_adr import attacks, graph
from keras_adr import objective as adr_objective
from keras_adr._model_inputs import checked_labels, num_images, unpack
from keras_adr._training_metrics import MetricsMixin
from keras_adr.config import ADRConfig

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


class ADRMixin(MetricsMixin):
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
        x, y = unpack(data)
        y = checked_labels(y, self._num_classes(), num_images(x))
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
        x, y = unpack(data)
        y = checked_labels(y, self._num_classes(), num_images(x))
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
