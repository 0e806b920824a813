"""Training-step time per precision, one process per run (issue 14).

Issue 14 found that mixed_bfloat16 halves the step time of `small_cnn` on a
CPU with AVX512_BF16, but that about one process in four runs at 1.3x or at
float32's speed, also with fixed seeds and data. Whatever decides it is set
per process, so every run here is its own process, and the runs of the
configurations are interleaved (round by round) so that a change of machine
load hits them alike.

Each run (a child process, `--child`) builds `small_cnn` in the policy,
compiles it (SGD), warms up, then times `--steps` single training steps on
real Fashion-MNIST batches (`model.train_function`, the compiled
`train_step`) and writes one JSON row: every step time and their median,
and what might explain a slow process:

* the oneDNN implementation of every primitive the process created
  (`ONEDNN_VERBOSE=profile_create` prints one line per created primitive,
  none per execution, so it does not slow the timed steps), e.g.
  `brg_conv_fwd:avx10_1_512_amx` against a fallback such as `gemm:jit` or
  `ref`;
* the CPU model (a VM can land on another host), the CPUs the process may
  run on, TensorFlow's thread settings, the load average before and after,
  whether address-space randomisation was on (alignment-dependent speed
  would change with it; `--no_aslr` runs the children under `setarch -R`).

Rows go to `<output_dir>/rows/` as they finish (a rerun skips finished
rows); the summary is `<output_dir>/summary.md`. The target of issue 14:
every bfloat16 process at least 1.7x faster than float32 for both defenses.

Usage (a quiet machine: nothing else running; about 1 minute per run):
    python -m benchmarks.precision_speed --runs=8 \\
        --output_dir=benchmarks/results/precision_speed
Smoke test:
    python -m benchmarks.precision_speed --runs=1 --steps=2 --warmup=1 \\
        --policies=float32,mixed_bfloat16 --defenses=pgd_at --output_dir=/tmp/ps
"""

import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

if not __package__:  # `python benchmarks/precision_speed.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import results_io  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("policies", ["float32", "mixed_bfloat16"], "Keras dtype policies to time.")
flags.DEFINE_list("defenses", ["pgd_at", "adr_pgd"], "Defenses to time.")
flags.DEFINE_integer("runs", 8, "Processes per (policy, defense).")
flags.DEFINE_integer("steps", 16, "Timed training steps per process.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, oneDNN primitive creation).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra/inter-op threads (0 = TensorFlow's choice).")
flags.DEFINE_bool("no_aslr", False, "Run the children under `setarch -R` (no ASLR).")
flags.DEFINE_string("output_dir", None, "Where rows/ and summary.md go.")
flags.DEFINE_string("child", None, "Internal: run one measurement and print its row as JSON.")

_ROW_MARK = "PRECISION_SPEED_ROW "
# oneDNN v3 verbose line of a created primitive:
# onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx10_1_512_amx,...
_ONEDNN_CREATE = re.compile(r"onednn_verbose,(?:v\d+,)?primitive,create[^,]*,cpu,([^,]+),([^,]+),")


def _row_name(policy, defense, run):
    return f"{policy}_{defense}_run{run}"


def _cpu_model():
    return results_io.cpu_info()[0]


def _status(policy, defense):
    """What the child knows about its process before timing."""
    import tensorflow as tf

    try:
        with open("/proc/sys/kernel/randomize_va_space") as f:
            aslr = f.read().strip()
    except OSError:
        aslr = None
    return {
        "policy": policy,
        "defense": defense,
        "pid": os.getpid(),
        "cpu": _cpu_model(),
        "cpus_allowed": sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "aslr": aslr,
        "personality_no_aslr": bool(FLAGS.no_aslr),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "load_before": os.getloadavg(),
    }


def _measure(policy, defense):
    """One run in this process: the row (without the oneDNN kernels)."""
    results_io.set_threads(FLAGS.threads)
    import keras
    import numpy as np

    import keras_adr
    from keras_adr import data, precision

    row = _status(policy, defense)
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        model = keras_adr.ADRModel(
            keras_adr.models.small_cnn(),
            keras_adr.presets.get(defense, attack_steps=FLAGS.attack_steps),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    batches = (
        data.load(
            "fashion_mnist",
            f"train[:{FLAGS.batch_size * 20}]",
            batch_size=FLAGS.batch_size,
            drop_remainder=True,
        )
        .cache()
        .repeat()
    )
    iterator = iter(batches)
    model.make_train_function()

    def step():
        logs = model.train_function(iterator)
        float(np.asarray(next(iter(logs.values()))))  # Waits for the step.

    for _ in range(FLAGS.warmup):
        step()
    times = []
    for _ in range(FLAGS.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    row.update(
        step_seconds=[round(t, 5) for t in times],
        median_step_seconds=statistics.median(times),
        load_after=os.getloadavg(),
    )
    return row


def _child_main():
    policy, defense = FLAGS.child.split(":")
    print(_ROW_MARK + json.dumps(_measure(policy, defense)), flush=True)


def _run_child(policy, defense):
    """Runs one measurement in a new process; returns its row with the oneDNN kernels."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.precision_speed",
        f"--child={policy}:{defense}",
        f"--steps={FLAGS.steps}",
        f"--warmup={FLAGS.warmup}",
        f"--batch_size={FLAGS.batch_size}",
        f"--attack_steps={FLAGS.attack_steps}",
        f"--threads={FLAGS.threads}",
        f"--no_aslr={FLAGS.no_aslr}",
    ]
    if FLAGS.no_aslr:
        command = ["setarch", os.uname().machine, "-R", *command]
    env = dict(os.environ, ONEDNN_VERBOSE="profile_create")
    result = subprocess.run(command, capture_output=True, text=True, cwd=_REPO, env=env)
    rows = [line for line in result.stdout.splitlines() if line.startswith(_ROW_MARK)]
    if result.returncode != 0 or not rows:
        raise RuntimeError(
            f"The run {policy}/{defense} failed (exit {result.returncode}):\n"
            f"{result.stderr[-3000:]}"
        )
    row = json.loads(rows[-1][len(_ROW_MARK) :])
    kernels = collections.Counter()
    for line in (result.stdout + result.stderr).splitlines():
        match = _ONEDNN_CREATE.search(line)
        if match:
            kernels[f"{match.group(1)}:{match.group(2)}"] += 1
    row["onednn_kernels"] = dict(sorted(kernels.items()))
    return row


def _summary(rows):
    """Markdown: per (policy, defense) the process medians; per run the kernels."""
    by_config = collections.defaultdict(list)
    for row in rows:
        by_config[(row["policy"], row["defense"])].append(row)
    float32 = {
        d: statistics.median(r["median_step_seconds"] for r in rs)
        for (p, d), rs in by_config.items()
        if p == "float32"
    }
    table = []
    for (policy, defense), runs in sorted(by_config.items()):
        medians = sorted(r["median_step_seconds"] for r in runs)
        base = float32.get(defense)
        table.append(
            [
                policy,
                defense,
                str(len(runs)),
                f"{statistics.median(medians):.3f}",
                f"{medians[0]:.3f}–{medians[-1]:.3f}",
                f"{base / medians[-1]:.2f}" if base else "",
                ", ".join(f"{m:.3f}" for m in medians),
            ]
        )
    lines = [
        "# Training-step time per precision, one process per run",
        "",
        "`python -m benchmarks.precision_speed` (see its docstring). `small_cnn`, batch "
        f"{rows[0].get('batch_size', FLAGS.batch_size)}, PGD-{FLAGS.attack_steps} training "
        "attack; per process the median of its timed steps.",
        "",
        *results_io.markdown_table(
            [
                "policy",
                "defense",
                "processes",
                "median s/step",
                "range over processes",
                "float32 / slowest",
                "every process",
            ],
            table,
        ),
        "",
        "## oneDNN implementations per process (created primitives)",
        "",
    ]
    kernel_sets = collections.defaultdict(list)
    for row in rows:
        key = ", ".join(sorted(k for k in row["onednn_kernels"] if not k.startswith("reorder")))
        kernel_sets[(row["policy"], key)].append(f"{row['median_step_seconds']:.3f}")
    for (policy, key), times in sorted(kernel_sets.items()):
        lines.append(f"- {policy}: {key or '(none)'} -> {', '.join(times)} s/step")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.child:
        return _child_main()
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required (rows are written as they finish).")
    rows_dir = os.path.join(FLAGS.output_dir, "rows")
    os.makedirs(rows_dir, exist_ok=True)
    rows = []
    # Round by round, every configuration once per round.
    for run in range(FLAGS.runs):
        for defense in FLAGS.defenses:
            for policy in FLAGS.policies:
                path = os.path.join(rows_dir, _row_name(policy, defense, run) + ".json")
                row = results_io.read_json(path)
                if row is None:
                    row = _run_child(policy, defense)
                    row.update(
                        run=run, batch_size=FLAGS.batch_size, attack_steps=FLAGS.attack_steps
                    )
                    results_io.write_json_atomic(path, row)
                print(
                    f"{policy:15s} {defense:8s} run {run}: {row['median_step_seconds']:.3f} s/step "
                    f"{row['onednn_kernels']}",
                    flush=True,
                )
                rows.append(row)
    summary = _summary(rows)
    results_io.write_text(os.path.join(FLAGS.output_dir, "summary.md"), summary)
    print(summary)


if __name__ == "__main__":
    app.run(main)
