"""`ADRModel`: a functional classifier that outputs logits, wrapped for ADR training."""

import keras

from keras_adr._model_inputs import check_logits, find_latent_layer
from keras_adr.training import ADRMixin


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
            if its outputs are probabilities (see `keras_adr._model_inputs.check_logits`) and
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
        latent = find_latent_layer(backbone, latent_layer)
        check_logits(backbone, allow_probabilities)
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
