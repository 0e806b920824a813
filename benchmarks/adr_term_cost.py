"""What each ADR term costs in a training step, per precision (issue 14).

`benchmarks/precision_speed.py` found `adr_pgd` at 0.99 x `pgd_at`'s step
time in float32 but 1.13 x in mixed_bfloat16 (Intel AMX). This script
finds where the difference goes: in one process (so only ratios measured
together are compared), it builds `small_cnn` with `pgd_at`, `adr_pgd`, and
`adr_pgd` with one ADR term switched off at a time, and times their
compiled training steps round by round (one step of each configuration per
round, in a rotated order), so that a change of machine load hits every
configuration alike. A term's cost is `adr_pgd`'s median step time minus
the median without that term. Each step's process CPU time is recorded
too: "cores busy" (CPU / wall) says whether a term's work runs beside the
step's critical path, on otherwise idle cores, or lengthens it.

Rows go to `<output_dir>/<policy>.json` as each policy finishes (a rerun
skips finished policies); the report is `<output_dir>/summary.md`.

Usage (about 2 minutes per policy and instance on 2 idle cores):
    python -m benchmarks.adr_term_cost --output_dir=benchmarks/results/adr_term_cost
    python -m benchmarks.adr_term_cost --rounds=16 --instances=3 --policies=mixed_bfloat16 \\
        --sampled_fractions=0.25,0.125 --output_dir=benchmarks/results/adr_term_cost_sampled
    python -m benchmarks.adr_term_cost --noablations --rounds=24 --instances=8 \\
        --output_dir=benchmarks/results/adr_term_cost_ratio
Smoke test:
    python -m benchmarks.adr_term_cost --rounds=2 --warmup=1 --attack_steps=1 \\
        --policies=float32 --output_dir=/tmp/atc
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

if not __package__:  # `python benchmarks/adr_term_cost.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import results_io  # noqa: E402

flags.DEFINE_list("policies", ["float32", "mixed_bfloat16"], "Keras dtype policies.")
flags.DEFINE_integer("rounds", 16, "Timed steps per configuration.")
flags.DEFINE_integer(
    "instances",
    1,
    "Separately built models per configuration, timed alike (instances of one model can "
    "differ in speed by ~15%; a configuration's time is the median over all).",
)
flags.DEFINE_integer("warmup", 3, "Untimed steps per configuration first.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("threads", 0, "TensorFlow threads (0 = TensorFlow's choice).")
flags.DEFINE_list(
    "sampled_fractions",
    [],
    "Also time adr_pgd with global compactness on these shares of the latent features "
    "(ADRConfig.global_compactness_features), e.g. 0.25,0.125.",
)
flags.DEFINE_bool(
    "ablations",
    True,
    "Also time adr_pgd with each term off; --noablations times pgd_at and adr_pgd alone "
    "(more instances in the same time: their ratio measured in one process).",
)
flags.DEFINE_string("output_dir", "benchmarks/results/adr_term_cost", "Where rows and report go.")
FLAGS = flags.FLAGS

BASELINE, FULL = "pgd_at", "adr_pgd"


def configurations():
    """`{name: ADRConfig}`: the baseline, full ADR, and (`--ablations`) ADR without each term."""
    from keras_adr import presets

    full = presets.get(FULL, attack_steps=FLAGS.attack_steps)
    configs = {
        BASELINE: presets.get(BASELINE, attack_steps=FLAGS.attack_steps),
        FULL: full,
    }
    for term in full.enabled_terms if FLAGS.ablations else ():
        configs[f"{FULL} without {term}"] = full.replace(**{term: 0.0})
    for fraction in FLAGS.sampled_fractions:
        configs[f"{FULL}, global compactness on {float(fraction):g} of features"] = full.replace(
            global_compactness_features=float(fraction)
        )
    return configs


def _build(config, policy):
    import keras

    import keras_adr
    from keras_adr import precision

    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        model = keras_adr.ADRModel(keras_adr.models.small_cnn(), config)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def measure(policy):
    """Median step seconds per configuration, all timed in this process."""
    from benchmarks import step_timing

    variants = {name: dict(config=c, policy=policy) for name, c in configurations().items()}
    functions = step_timing.train_functions(
        variants, _build, FLAGS.batch_size, instances=FLAGS.instances, warmup=FLAGS.warmup
    )
    # Process CPU time per step too: cores busy = CPU / wall shows whether a
    # term's work fills idle cores or adds to the critical path.
    name_of = {id(fn): name for name, fns in functions.items() for fn in fns}
    cpu_seconds = {name: [] for name in functions}

    def step(fn):
        start = time.process_time()
        step_timing.run_steps(fn, 1)
        cpu_seconds[name_of[id(fn)]].append(time.process_time() - start)

    medians, samples = step_timing.alternate(functions, FLAGS.rounds, step)
    return {
        "policy": policy,
        "median_step_seconds": medians,
        "median_step_cpu_seconds": {name: float(np.median(t)) for name, t in cpu_seconds.items()},
        "step_seconds": samples,  # per configuration, per instance
        "rounds": FLAGS.rounds,
        "instances": FLAGS.instances,
        "batch_size": FLAGS.batch_size,
        "attack_steps": FLAGS.attack_steps,
        "threads": FLAGS.threads,
        "machine": results_io.machine_info(load=os.getloadavg()),
    }


def markdown(rows):
    lines = [
        "# Cost of each ADR term per training step",
        "",
        "`small_cnn`, batch {batch_size}, PGD-{attack_steps} training attack; every "
        "configuration of a policy timed in one process, interleaved, median of "
        "{rounds} steps of each of {instances} separately built model(s). Command: "
        "`python -m benchmarks.adr_term_cost`.".format(**{"instances": 1, **rows[0]}),
        "",
    ]
    for row in rows:
        medians = row["median_step_seconds"]
        cpu = row.get("median_step_cpu_seconds", {})  # not in rows from before it
        full, base = medians[FULL], medians[BASELINE]
        table = [
            [
                name,
                f"{seconds:.4f}",
                f"{seconds / base:.3f}",
                "" if name in (FULL, BASELINE) else f"{1000 * (full - seconds):+.1f}",
                f"{cpu[name]:.4f}" if name in cpu else "",
                f"{cpu[name] / seconds:.2f}" if name in cpu else "",
            ]
            for name, seconds in medians.items()
        ]
        lines += [
            f"## {row['policy']}",
            "",
            *results_io.markdown_table(
                [
                    "configuration",
                    "s/step",
                    f"/ {BASELINE}",
                    f"{FULL} - row (ms): a term's cost, or what sampling saves",
                    "CPU s/step",
                    "cores busy",
                ],
                table,
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    rows = []
    for policy in FLAGS.policies:
        path = os.path.join(FLAGS.output_dir, f"{policy}.json")
        row = results_io.read_json(path)
        if row is None:
            row = measure(policy)
            results_io.write_json_atomic(path, row)
        rows.append(row)
        print(policy, row["median_step_seconds"], flush=True)
    report = markdown(rows)
    results_io.write_text(os.path.join(FLAGS.output_dir, "summary.md"), report)
    print(report)


if __name__ == "__main__":
    app.run(main)
