"""Argument checks shared by the config objects: one-line errors that name the field."""

import math


def check_choice(name, value, allowed):
    """Raises ValueError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def check_number(
    name,
    value,
    *,
    minimum=None,
    exclusive_minimum=None,
    maximum=None,
    exclusive_maximum=None,
    integer=False,
):
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not float(value).is_integer())
        or not math.isfinite(value)
    ):
        raise ValueError(f"`{name}` must be {kind}; got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value!r}.")
    if exclusive_minimum is not None and value <= exclusive_minimum:
        raise ValueError(f"`{name}` must be > {exclusive_minimum}; got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}; got {value!r}.")
    if exclusive_maximum is not None and value >= exclusive_maximum:
        raise ValueError(f"`{name}` must be < {exclusive_maximum}; got {value!r}.")


def plain(value):
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value
