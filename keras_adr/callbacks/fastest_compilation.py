"""`FastestCompilation`: keeps the fastest of several compilations of the training step.

`FastestCompilation` compiles the training step more than once at the start
of `fit` and keeps the compilation whose steps ran fastest: a compiled step
can land on a slow path for as long as it is used (issue 14).
"""

import statistics
import time

import keras
from absl import logging

from keras_adr import distribute

# A slow compiled step is slow on every step, so a few timed steps tell
# (docs/mixed-precision.md, "Slow compilations").
DEFAULT_COMPILATIONS = 2
DEFAULT_TIMED_STEPS = 8
DEFAULT_WARMUP_STEPS = 2


class FastestCompilation(keras.callbacks.Callback):
    """Compiles the training step `compilations` times and keeps the fastest.

    A compiled step can be slow for as long as it is used. On the
    development machine (2-core Xeon with AMX, bfloat16) about one
    compilation of `adr_pgd`'s training step in eight ran 1.3-1.5x slower
    than the others: TensorFlow's oneDNN graph rewrite had left the max-pool
    gradients inside the attack's loop on TensorFlow's own kernel, and a
    new compilation was a new draw (docs/mixed-precision.md, "Slow compilations"). That kind
    is avoided since (the training attack is unrolled on CPUs); this
    callback guards against others. At the start of `fit` it
    times `steps` steps of the step Keras compiled, compiles it anew
    (`model.make_train_function(force=True)`), times it too, and so on, then
    hands `fit` the fastest (Keras calls `model.train_function` afresh for
    every step). Every timed step is a real training step: nothing is
    repeated or skipped, only the step's compiled program changes.

    Steps are timed from one batch end to the next, after `warmup_steps`
    untimed ones per compilation (the first traces it); an epoch boundary is
    not counted as a step. With fewer steps in the run than the timing needs,
    the step in use at the end is kept. A later `fit` keeps the chosen step.

    Args:
        compilations: How many compilations to time (1: do nothing).
        steps: Timed steps per compilation.
        warmup_steps: Untimed steps after each compilation.
        clock: Function returning the time in seconds (tests pass their own).

    Attributes:
        step_seconds: After the choice, the median step seconds of each
            compilation, in order.
        kept: After the choice, the index of the compilation kept.

    Raises:
        ValueError: At the start of `fit` under a strategy with several
            workers: each worker would choose on its own, and compilations
            that differ between workers must not run collectives together.
    """

    def __init__(
        self,
        compilations=DEFAULT_COMPILATIONS,
        steps=DEFAULT_TIMED_STEPS,
        warmup_steps=DEFAULT_WARMUP_STEPS,
        clock=time.perf_counter,
    ):
        super().__init__()
        self._clock = clock
        for name, value, least in (
            ("compilations", compilations, 1),
            ("steps", steps, 1),
            ("warmup_steps", warmup_steps, 1),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}; got {value!r}.")
        self.compilations = compilations
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.step_seconds = None
        self.kept = None
        self._kept_function = None

    def on_train_begin(self, logs=None):
        self._candidates = []  # (median step seconds, train_function)
        self._times, self._seen, self._last = [], 0, None
        chosen = self._kept_function is not None and self.model.train_function is (
            self._kept_function
        )
        self._done = self.compilations == 1 or chosen
        if not self._done and distribute.num_workers(self.model.distribute_strategy) > 1:
            raise ValueError(
                "FastestCompilation cannot run with several workers (each would keep its own "
                "compilation); leave it out, or use compilations=1."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None  # validation and epoch-end callbacks are not a step

    def on_train_batch_end(self, batch, logs=None):
        if self._done:
            return
        now = self._clock()
        self._seen += 1
        if self._seen > self.warmup_steps and self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        if len(self._times) < self.steps:
            return
        self._candidates.append((statistics.median(self._times), self.model.train_function))
        self._times, self._seen, self._last = [], 0, None
        if len(self._candidates) < self.compilations:
            self.model.make_train_function(force=True)
            return
        self.step_seconds = [seconds for seconds, _ in self._candidates]
        self.kept = min(range(len(self.step_seconds)), key=self.step_seconds.__getitem__)
        self._kept_function = self._candidates[self.kept][1]
        self.model.train_function = self._kept_function
        self._candidates = []  # Frees the others.
        self._done = True
        logging.info(
            "Training step compiled %d times: %s s/step; keeping compilation %d.",
            len(self.step_seconds),
            ", ".join(f"{seconds:.3f}" for seconds in self.step_seconds),
            self.kept + 1,
        )

    def get_config(self):
        return {
            "compilations": self.compilations,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
        }
