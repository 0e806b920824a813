"""TFDS-style split names: `"train"`, `"test[:1000]"`, `"train[55000:]"`, `"train[:10%]"`."""

import re

# `train`, `test[:1000]`, `train[55000:]`, `train[:10%]`, `test[-5%:]`.
_SPLIT_RE = re.compile(
    r"^(?P<name>[\w-]+)"
    r"(?:\[(?P<start>-?[\d.]+%?)?:(?P<stop>-?[\d.]+%?)?\])?$"
)


def parse_split(split, valid_names):
    """Parses `"name[start:stop]"` into `(name, start, stop)` strings."""
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if match is None or match["name"] not in valid_names:
        raise ValueError(
            f"Invalid split {split!r}: expected one of {list(valid_names)}, "
            "optionally sliced like 'train[:55000]', 'train[55000:]' or "
            "'train[:10%]'."
        )
    return match["name"], match["start"], match["stop"]


def resolve_slice(split, start, stop, num_examples):
    """Turns slice bounds (`"100"`, `"-5"`, `"10%"` or `None`) into ints.

    Follows TFDS: percentages round to the closest example, negative values
    count from the end, and out-of-range bounds are an error.
    """
    bounds = []
    for bound, default in ((start, 0), (stop, num_examples)):
        if bound is None:
            bounds.append(default)
            continue
        try:
            if bound.endswith("%"):
                value = round(float(bound[:-1]) * num_examples / 100.0)
            else:
                value = int(bound)
        except ValueError:
            raise ValueError(f"Invalid slice bound {bound!r} in {split!r}.") from None
        if abs(value) > num_examples:
            raise ValueError(f"Split {split!r} is out of range for {num_examples} examples.")
        bounds.append(value + num_examples if value < 0 else value)
    return bounds[0], bounds[1]
