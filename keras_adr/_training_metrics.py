"""What an ADR model reports: its loss, accuracies, terms and diagnostics, and the user's metrics.

The metrics given to `compile` run on the clean predictions and, as
`adv_<name>`, on the adversarial ones.
"""

import keras
import tensorflow as tf

from keras_adr import _keras_compat


class MetricsMixin:
    """The metrics of `ADRMixin`, and `compile(metrics=...)` on clean and adversarial logits.

    Mixed in by `keras_adr.training.ADRMixin`, whose `_init_adr` creates the
    trackers read here and `_adv_compile_metrics` (None until `compile`).
    """

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
