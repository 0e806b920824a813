"""The one place that reaches into Keras' private API, checked before use.

Keras has no public way to put an optimizer's moving average of the weights
into the model for a moment (to save it) and back: `SwapEMAWeights` does it
only from its own callback hooks. `averaged_weights` reuses that callback's
swap, so distributed variables are handled as Keras handles them.
"""

import contextlib

import keras


def uses_ema(model):
    """Whether `model`'s optimizer keeps a moving average of the weights (`use_ema=True`)."""
    return bool(getattr(getattr(model, "optimizer", None), "use_ema", False))


def _swapper(model):
    swapper = keras.callbacks.SwapEMAWeights()
    if not hasattr(swapper, "_swap_variables"):
        raise RuntimeError(
            f"keras_adr cannot swap the EMA weights with Keras {keras.__version__}: "
            "keras.callbacks.SwapEMAWeights has no _swap_variables. Install a Keras release "
            "that keras_adr supports (see requirements.txt)."
        )
    swapper.set_model(model)
    return swapper


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block, `model` holds its optimizer's averaged (EMA) weights.

    The trained weights are put back on leaving, also on an exception. A
    model whose optimizer keeps no average is left as it is.

    Args:
        model: A compiled `keras.Model` whose optimizer has taken a step.
    """
    if not uses_ema(model):
        yield model
        return
    swapper = _swapper(model)
    swapper._swap_variables()
    try:
        yield model
    finally:
        swapper._swap_variables()
