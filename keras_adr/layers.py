"""Keras layers of keras-adr.

`Latent` marks the latent code `z` of a classifier: `ADRModel` finds it by
type, so a model needs no naming convention.
"""

import keras


@keras.saving.register_keras_serializable(package="keras_adr")
class Latent(keras.layers.Layer):
    """Identity layer whose output is the latent code `z = g(x)` of ADR.

    Put it between the feature extractor and the classifier head:

    ```python
    z = keras_adr.layers.Latent()(keras.layers.Flatten()(features))
    logits = keras.layers.Dense(10)(z)
    ```

    It has no weights and changes nothing in the forward pass; `ADRModel`
    uses its output as `z`. A model must contain exactly one.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape
