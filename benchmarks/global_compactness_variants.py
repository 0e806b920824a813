"""Exact global compactness, computed otherwise: is any form faster? (issue 14)

In a mixed_bfloat16 training step on an AMX CPU, `adr_pgd`'s extra time over
`pgd_at` is mostly global compactness: two sorts (`TopKV2`), two binary
searches (`LowerBound`), gathers and prefix sums, which bfloat16 does not
speed up (README, "Mixed precision"). The library's form,
`pairwise.l1_sums_sorted`, sorts each feature's clean codes by value
and then by (label, value). This script times it against exact alternatives
for the second order, in one process, alternating round by round, after
checking that every alternative gives the same values and gradients:

* `packed_counts`: no second sort. Each label's running count along the
  value order is kept in `bits`-wide fields of int32 words (`bits` enough
  for the batch size), summed with one cumulative sum; a code's place in the
  (label, value) order is its label's start plus that count, and the values
  are scattered there.
* `int64_class_sort`: the second order from one sort of int64 keys
  `label * 2**32 + (value key + 2**31)`, independent of the first sort (no
  gathers by the first order).

Each is timed forward and backward (a training step needs both: the value
for the loss metric, the gradient for the update) on ReLU-like codes (half
of them 0; the latent codes of `small_cnn` after 30 `adr_pgd` steps were 54%
zeros).

In the same rounds it times parts of the library's form, for a floor on
what any sort-based form can cost: the reference side alone (the library
with no queries: both orders and their prefix sums, which a training step
can start before the attack ends), one `TopKV2` sort of the `[k, B]` int32
keys, and the same sort compiled by XLA (`jit_compile`).

Usage (about 1 minute on 2 idle cores):
    python -m benchmarks.global_compactness_variants \\
        --output=benchmarks/results/global_compactness_variants.json
"""

import os
import sys

from absl import app, flags

if not __package__:  # `python benchmarks/global_compactness_variants.py`: as `python -m`.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import results_io  # noqa: E402

flags.DEFINE_integer("batch_size", 128, "Clean and adversarial codes per batch (B).")
flags.DEFINE_integer("features", 1024, "Latent features (k).")
flags.DEFINE_integer("classes", 10, "Labels.")
flags.DEFINE_integer("rounds", 12, "Alternating rounds.")
flags.DEFINE_integer("calls", 20, "Calls per variant per round.")
flags.DEFINE_integer("threads", 0, "TensorFlow threads (0 = TensorFlow's choice).")
flags.DEFINE_string(
    "output", "benchmarks/results/global_compactness_variants.json", "JSON (and .md) output."
)
FLAGS = flags.FLAGS

LIBRARY = "sorted (library)"  # the library's form: the name of its row

# Equality is checked on these `(B_ref, B_query, k, classes, share of zeros)`.
CHECK_CASES = (
    (128, 128, 64, 10, 0.5),
    (7, 5, 3, 3, 0.0),
    (64, 32, 16, 100, 0.3),
    (300, 9, 4, 2, 0),
)


def packed_counts(z_ref, y_ref, z_query, y_query, num_classes):
    """As `pairwise.l1_sums_sorted`, with per-label counts packed in int32 fields."""
    import tensorflow as tf

    from keras_adr import pairwise

    refs, queries = tf.transpose(z_ref), tf.transpose(z_query)
    n_ref = tf.shape(refs)[1]
    by_value = pairwise.value_order(refs, queries)
    order, ordered, below = by_value.order, by_value.ordered, by_value.below
    # Fields wide enough for a count of n_ref: bit_length(n_ref) bits.
    bits = tf.reduce_sum(tf.cast(n_ref >= tf.bitwise.left_shift(1, tf.range(31)), tf.int32))
    per_word = 32 // bits
    words = (num_classes + per_word - 1) // per_word
    mask = tf.bitwise.left_shift(1, bits) - 1
    labels = tf.gather(y_ref, order)  # [k, N] in value order
    in_word = tf.equal((labels // per_word)[..., None], tf.range(words))  # [k, N, W]
    shift = (labels % per_word) * bits
    ones = tf.where(in_word, tf.bitwise.left_shift(1, shift)[..., None], 0)
    counts = tf.pad(tf.cumsum(ones, axis=1), [[0, 0], [1, 0], [0, 0]])  # [k, N + 1, W]

    def field(packed, word, field_shift):
        selected = tf.reduce_sum(tf.where(word, packed, 0), axis=-1)
        return tf.bitwise.bitwise_and(tf.bitwise.right_shift(selected, field_shift), mask)

    q_word = tf.equal((y_query // per_word)[:, None], tf.range(words))
    same_below = field(tf.gather(counts, below, batch_dims=1), q_word, (y_query % per_word) * bits)
    class_count = tf.math.bincount(y_ref, minlength=num_classes, maxlength=num_classes)
    class_start = tf.cumsum(class_count, exclusive=True)
    position = tf.gather(class_start, labels) + field(counts[:, :-1], in_word, shift)
    rows = tf.broadcast_to(tf.range(tf.shape(refs)[0])[:, None], tf.shape(position))
    by_label = tf.scatter_nd(tf.stack([rows, position], -1), ordered, tf.shape(ordered))
    query_position = tf.gather(class_start, y_query) + same_below
    same_sums = pairwise.same_label_sums(
        queries, y_ref, y_query, num_classes, by_label, query_position
    )
    return by_value.all_sums, same_sums


def int64_class_sort(z_ref, y_ref, z_query, y_query, num_classes):
    """As `pairwise.l1_sums_sorted`, the second order from one int64 sort."""
    import tensorflow as tf

    from keras_adr import pairwise

    refs, queries = tf.transpose(z_ref), tf.transpose(z_query)
    by_value = pairwise.value_order(refs, queries)
    offset = lambda y: tf.cast(y, tf.int64) * 2**32 + 2**31
    negated, label_order = tf.math.top_k(
        -(tf.cast(by_value.keys, tf.int64) + offset(y_ref)), k=tf.shape(refs)[1]
    )
    position = tf.searchsorted(
        -negated, tf.cast(by_value.query_keys, tf.int64) + offset(y_query), side="left"
    )
    same_sums = pairwise.same_label_sums(
        queries,
        y_ref,
        y_query,
        num_classes,
        tf.gather(refs, label_order, batch_dims=1),
        position,
    )
    return by_value.all_sums, same_sums


def variants():
    from keras_adr import pairwise

    return {
        LIBRARY: pairwise.l1_sums_sorted,
        "packed_counts": packed_counts,
        "int64_class_sort": int64_class_sort,
    }


def parts(library):
    """Parts of the library's form, each a `tf.function` of the four inputs.

    `library` is the library's form as `value_and_gradient` returns it.
    """
    import tensorflow as tf

    from keras_adr import pairwise

    def keys(z_ref):
        return pairwise.order_keys(tf.transpose(z_ref))

    xla_sort = tf.function(lambda int_keys: tf.sort(int_keys, axis=-1), jit_compile=True)
    return {
        "reference side (library, no queries)": tf.function(
            lambda z_ref, y_ref, z_query, y_query: library(z_ref, y_ref, z_query[:0], y_query[:0])
        ),
        "one sort of [k, B] int32 keys (TopKV2)": tf.function(
            lambda z_ref, *_: pairwise.sort_ascending(keys(z_ref))
        ),
        "one sort of [k, B] int32 keys (XLA)": tf.function(lambda z_ref, *_: xla_sort(keys(z_ref))),
    }


def value_and_gradient(pairwise_sums):
    """A `tf.function` of `(z_ref, y_ref, z_query, y_query)`: both sums and d(term)/d(z_query)."""
    import tensorflow as tf

    from keras_adr import losses

    scale = losses.DEFAULT_LABEL_SCALE

    codes_spec = tf.TensorSpec([None, None], tf.float32)
    labels_spec = tf.TensorSpec([None], tf.int32)

    @tf.function(input_signature=[codes_spec, labels_spec, codes_spec, labels_spec])
    def run(z_ref, y_ref, z_query, y_query):
        num_classes = tf.maximum(tf.reduce_max(y_ref), tf.reduce_max(y_query)) + 1
        with tf.GradientTape() as tape:
            tape.watch(z_query)
            all_sums, same_sums = pairwise_sums(z_ref, y_ref, z_query, y_query, num_classes)
            term = tf.reduce_sum((1 - 1 / scale) * all_sums + (1 / scale) * same_sums)
        return all_sums, same_sums, tape.gradient(term, z_query)

    return run


def codes(rng, n_ref, n_query, features, classes, zero_share):
    """Random codes with a share of exact zeros and ties between clean and adversarial."""
    import numpy as np
    import tensorflow as tf

    z_ref = rng.normal(size=(n_ref, features)).astype(np.float32)
    z_query = rng.normal(size=(n_query, features)).astype(np.float32)
    z_ref[rng.random(z_ref.shape) < zero_share] = 0
    z_query[rng.random(z_query.shape) < zero_share] = 0
    shared = min(n_ref, n_query)
    z_query[:shared, 0] = z_ref[:shared, 0]  # ties
    labels = lambda n: rng.integers(0, classes, n).astype(np.int32)
    return tuple(tf.constant(a) for a in (z_ref, labels(n_ref), z_query, labels(n_query)))


def max_differences(functions, cases=CHECK_CASES, seed=0):
    """Per variant, the largest |difference| from the library's values and gradients."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reference, *others = functions.items()
    differences = {name: 0.0 for name, _ in others}
    for case in cases:
        args = codes(rng, *case)
        expected = reference[1](*args)
        for name, function in others:
            for got, want in zip(function(*args), expected):
                differences[name] = max(differences[name], float(np.max(np.abs(got - want))))
    return differences


def measure():
    import numpy as np
    import tensorflow as tf

    from benchmarks import step_timing

    functions = {name: value_and_gradient(f) for name, f in variants().items()}
    differences = max_differences(functions)
    part_functions = parts(functions[LIBRARY])
    functions.update(part_functions)
    size = (FLAGS.batch_size, FLAGS.batch_size, FLAGS.features, FLAGS.classes, 0.5)
    args = codes(np.random.default_rng(1), *size)

    def call(function):
        for _ in range(FLAGS.calls):
            outputs = function(*args)
        tf.nest.flatten(outputs)[-1].numpy()  # Waits for the calls.

    for function in functions.values():
        call(function)  # Traces and warms up.
    medians, samples = step_timing.alternate(functions, FLAGS.rounds, call)
    library = medians[LIBRARY]
    return {
        "ms_per_call": {name: 1000 * t / FLAGS.calls for name, t in medians.items()},
        "relative_to_library": {name: t / library for name, t in medians.items()},
        "max_difference_from_library": differences,
        "parts": list(part_functions),
        "seconds_per_round": samples,
        "batch_size": FLAGS.batch_size,
        "features": FLAGS.features,
        "classes": FLAGS.classes,
        "rounds": FLAGS.rounds,
        "calls": FLAGS.calls,
        "machine": results_io.machine_info(load=os.getloadavg()),
    }


def markdown(results):
    differences = results["max_difference_from_library"]
    part_names = results.get("parts", [])
    ms_per_call = results["ms_per_call"]

    def row(name):
        return [name, f"{ms_per_call[name]:.2f}", f"{results['relative_to_library'][name]:.2f}"]

    part_rows = [row(name) for name in ms_per_call if name in part_names]
    rows = [
        row(name) + ["-" if name not in differences else f"{differences[name]:.1e}"]
        for name in ms_per_call
        if name not in part_names
    ]
    return "\n".join(
        [
            "# Exact global compactness: alternative forms",
            "",
            "Value and gradient of the pairwise L1 sums, B = {batch_size}, k = {features}, "
            "{classes} labels, half the codes 0; median over {rounds} alternating rounds "
            "of {calls} calls. Command: `python -m "
            "benchmarks.global_compactness_variants`.".format(**results),
            "",
            *results_io.markdown_table(
                ["form", "ms per call", "/ library", "max abs difference from library"], rows
            ),
            "",
            "Parts of the library's form, timed in the same rounds:",
            "",
            *results_io.markdown_table(["part", "ms per call", "/ library"], part_rows),
            "",
        ]
    )


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    results = measure()
    report = markdown(results)
    results_io.write_results(FLAGS.output, results, report)
    print(report)


if __name__ == "__main__":
    app.run(main)
