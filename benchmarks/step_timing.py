"""Timing training steps of separately built models, round by round (shared by benchmarks).

`alternate` times every variant once per round, in an order that rotates
from round to round, so that a change of machine load hits every variant
alike; `train_functions` builds the compiled training steps it times.
"""

import time

import numpy as np

from keras_adr import data


def alternate(functions, repeats, call):
    """Median seconds of `call(fn)` per variant over `repeats` alternating rounds.

    `functions` maps a variant to one callable or to a list of instances of
    it (e.g. separately built models). Every round runs every instance once;
    the order rotates from round to round so that no instance always follows
    the same one. A variant's time is the median over all its instances and
    rounds; the samples are returned per instance.
    """
    entries = [
        (name, i, fn)
        for name, fns in functions.items()
        for i, fn in enumerate(fns if isinstance(fns, list) else [fns])
    ]
    samples = {name: {} for name in functions}
    for round_index in range(repeats):
        shift = round_index % len(entries)
        for name, i, fn in entries[shift:] + entries[:shift]:
            start = time.perf_counter()
            call(fn)
            samples[name].setdefault(i, []).append(time.perf_counter() - start)
    medians = {
        name: float(np.median([t for ts in per.values() for t in ts]))
        for name, per in samples.items()
    }
    rounded = {
        name: [[round(t, 4) for t in per[i]] for i in sorted(per)] for name, per in samples.items()
    }
    return medians, rounded


def train_batches(batch_size, num_batches=50):
    """Real Fashion-MNIST batches, cached, cycling (the first 50 batches of train)."""
    return (
        data.load(
            "fashion_mnist",
            f"train[:{batch_size * num_batches}]",
            batch_size=batch_size,
            drop_remainder=True,
        )
        .cache()
        .repeat()
    )


def train_functions(variants, build, batch_size, instances, warmup=5):
    """`{name: [(train_function, iterator), ...]}`: `instances` models per variant.

    `build(**variants[name])` returns a compiled model.

    Separately built instances of the same model can differ in speed by ~15%
    on this machine (allocation, not arithmetic), so every variant is
    timed over several instances.
    """
    batches = train_batches(batch_size)
    functions = {}
    for name, kwargs in variants.items():
        functions[name] = []
        for _ in range(instances):
            model = build(**kwargs)
            model.make_train_function()
            iterator = iter(batches)
            for _ in range(warmup):  # trace and warm up
                model.train_function(iterator)
            functions[name].append((model.train_function, iterator))
    return functions


def run_steps(fn, steps):
    train_function, iterator = fn
    for _ in range(steps):
        logs = train_function(iterator)
    # Wait for the step: read one value.
    float(np.asarray(next(iter(logs.values()))))
