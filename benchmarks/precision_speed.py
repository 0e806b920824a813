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
  run on, TensorFlow's thread settings (`--threads`; `--inter_op_threads`
  for the inter-op pool alone), the load average before and after,
  whether address-space randomisation was on (alignment-dependent speed
  would change with it; `--no_aslr` runs the children under `setarch -R`),
  and `ONEDNN_MAX_CPU_ISA` if set: the children inherit the environment, so
  `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` times on an AMX CPU the bfloat16
  kernels of a CPU without AMX (such as the AMD EPYC of issue 14).
* the process's user and system CPU seconds, page faults and context
  switches per timed step (`resource.getrusage`);
* after the timed steps, the median step time of the same steps with the
  training step compiled anew (`make_train_function(force=True)`), once or
  `--recompilations` times: each compilation is a new draw of the slow
  kind seen on the development machine;
* with `--op_profile`, the same compiled step timed again under
  TensorFlow's profiler: seconds per op type and how long ops ran on two
  threads at once (`benchmarks/op_profile.py`);
* then the parts of a step, each compiled and timed on its own: the
  training attack, the objective with its gradients for fixed adversarial
  images, inference, and global compactness (the exact term) with its
  gradient alone. A slow process is then slow in every part (the process
  or the machine) or in one (a kernel); and `adr_pgd`'s extra time shows
  where it goes.

Rows go to `<output_dir>/rows/` as they finish (a rerun skips finished
rows); the summary is `<output_dir>/summary.md`: per (defense, policy) the
median, minimum and maximum over processes of the per-process median step
time, the speed-up over float32, `adr_pgd` / `pgd_at` per policy, and the
targets of issue 14 marked met or not: every bfloat16 process at least 1.7x
faster than float32's median, for both defenses, and `adr_pgd` at most
1.05 x `pgd_at` in each policy.

`benchmarks/speed.py` runs the same measurement as its `precision` section
(it imports `run_rounds`, `analyse` and the markdown helpers from here; the
default policies and defenses are this module's `DEFAULT_POLICIES` and
`DEFAULT_DEFENSES`).

Usage (a quiet machine: nothing else running; about 1 minute per run):
    python -m benchmarks.precision_speed --runs=8 \\
        --output_dir=benchmarks/results/precision_speed
Smoke test:
    python -m benchmarks.precision_speed --runs=1 --steps=2 --warmup=1 \\
        --policies=float32,mixed_bfloat16 --defenses=pgd_at --output_dir=/tmp/ps
"""

import collections
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

from absl import app, flags

if not __package__:  # `python benchmarks/precision_speed.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import op_profile, results_io  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The defaults of this script and of `speed.py`'s precision section.
DEFAULT_POLICIES = ("float32", "mixed_bfloat16")
DEFAULT_DEFENSES = ("pgd_at", "adr_pgd")
DEFAULT_PROCESSES = 8
# Issue 14's targets: every process of TARGET_POLICY at least MIN_SPEEDUP
# times faster than the median process of BASE_POLICY, for every defense;
# and, in every policy, `adr_pgd`'s median at most MAX_ADR_RATIO x `pgd_at`'s.
BASE_POLICY = "float32"
TARGET_POLICY = "mixed_bfloat16"
MIN_SPEEDUP = 1.7
MAX_ADR_RATIO = 1.05

_ROW_MARK = "PRECISION_SPEED_ROW "
# oneDNN v3 verbose line of a created primitive:
# onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx10_1_512_amx,...
_ONEDNN_CREATE = re.compile(r"onednn_verbose,(?:v\d+,)?primitive,create[^,]*,cpu,([^,]+),([^,]+),")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How every process measures (the same for every configuration)."""

    steps: int = 16  # timed training steps per process
    warmup: int = 3  # untimed steps first (tracing, oneDNN primitive creation)
    batch_size: int = 128
    attack_steps: int = 10  # PGD steps of the training attack
    threads: int = 0  # TensorFlow intra/inter-op threads (0 = TensorFlow's choice)
    inter_op_threads: int = 0  # inter-op threads alone, over `threads` (0 = as `threads`)
    recompilations: int = 1  # times the step is compiled anew and timed after the first
    op_profile: bool = False  # profile the timed steps again: time per op type
    no_aslr: bool = False  # run the children under `setarch -R`
    # ADRConfig.global_compactness_features of every defense (1 = the exact term)
    global_compactness_features: float = 1.0


def define_flags():
    """The command line of this script (not defined on import: `speed.py` imports
    this module and has flags of the same names)."""
    defaults = Settings()
    flags.DEFINE_list("policies", list(DEFAULT_POLICIES), "Keras dtype policies to time.")
    flags.DEFINE_list("defenses", list(DEFAULT_DEFENSES), "Defenses to time.")
    flags.DEFINE_integer("runs", DEFAULT_PROCESSES, "Processes per (policy, defense).")
    flags.DEFINE_integer("steps", defaults.steps, "Timed training steps per process.")
    flags.DEFINE_integer(
        "warmup", defaults.warmup, "Untimed steps first (tracing, oneDNN primitive creation)."
    )
    flags.DEFINE_integer("batch_size", defaults.batch_size, "Batch size.")
    flags.DEFINE_integer("attack_steps", defaults.attack_steps, "PGD steps of the training attack.")
    flags.DEFINE_integer(
        "threads", defaults.threads, "TensorFlow intra/inter-op threads (0 = TensorFlow's choice)."
    )
    flags.DEFINE_integer(
        "inter_op_threads",
        defaults.inter_op_threads,
        "TensorFlow inter-op threads alone, over --threads (0 = as --threads).",
    )
    flags.DEFINE_integer(
        "recompilations",
        defaults.recompilations,
        "After the timed steps, how many times to compile the step anew and time it again.",
    )
    flags.DEFINE_bool(
        "op_profile",
        defaults.op_profile,
        "After the timed steps, time as many again under TensorFlow's profiler and record "
        "the time per op type (benchmarks/op_profile.py).",
    )
    flags.DEFINE_bool("no_aslr", defaults.no_aslr, "Run the children under `setarch -R` (no ASLR).")
    flags.DEFINE_float(
        "global_compactness_features",
        defaults.global_compactness_features,
        "ADRConfig.global_compactness_features of every defense (1 = the exact term).",
    )
    flags.DEFINE_string("output_dir", None, "Where rows/ and summary.md go.")
    flags.DEFINE_string("child", None, "Internal: run one measurement and print its row as JSON.")


def _settings_from_flags():
    f = flags.FLAGS
    return Settings(
        steps=f.steps,
        warmup=f.warmup,
        batch_size=f.batch_size,
        attack_steps=f.attack_steps,
        threads=f.threads,
        inter_op_threads=f.inter_op_threads,
        recompilations=f.recompilations,
        op_profile=f.op_profile,
        no_aslr=f.no_aslr,
        global_compactness_features=f.global_compactness_features,
    )


def _row_name(policy, defense, run):
    return f"{policy}_{defense}_run{run}"


def _cpu_model():
    return results_io.cpu_info()[0]


# --- One process ------------------------------------------------------------------


def _status(policy, defense, settings):
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
        "personality_no_aslr": bool(settings.no_aslr),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        # oneDNN's own cap on the instruction sets its kernels use (e.g.
        # `AVX512_CORE_BF16`: the bfloat16 kernels of a CPU without AMX).
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "load_before": os.getloadavg(),
    }


def measure(policy, defense, settings):
    """One run in this process: the row (without the oneDNN kernels)."""
    results_io.set_threads(settings.threads, settings.inter_op_threads)
    import keras
    import numpy as np

    import keras_adr
    from keras_adr import data, precision

    row = _status(policy, defense, settings)
    row["global_compactness_features"] = settings.global_compactness_features
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        model = keras_adr.ADRModel(
            keras_adr.models.small_cnn(),
            keras_adr.presets.get(
                defense,
                attack_steps=settings.attack_steps,
                global_compactness_features=settings.global_compactness_features,
            ),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    batches = (
        data.load(
            "fashion_mnist",
            f"train[:{settings.batch_size * 20}]",
            batch_size=settings.batch_size,
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

    _call_seconds(step, settings.warmup)
    first = _time_compiled_step(step, settings)
    row.update(
        step_seconds=[round(t, 5) for t in first["step_seconds"]],
        median_step_seconds=statistics.median(first["step_seconds"]),
        machine_per_step=first["machine_per_step"],
        per_step=first["per_step"],
        load_after=os.getloadavg(),
    )
    if "op_profile" in first:
        row["op_profile"] = first["op_profile"]
    # The same steps again with the step compiled anew: a slow process whose
    # fresh compilation is fast was slow in its compiled step, not as a whole.
    recompiled = []
    for _ in range(settings.recompilations):
        model.make_train_function(force=True)
        _call_seconds(step, settings.warmup)
        recompiled.append(_time_compiled_step(step, settings))
    if recompiled:
        each = lambda key: [timing[key] for timing in recompiled]
        medians = [statistics.median(times) for times in each("step_seconds")]
        row["recompiled_median_step_seconds"] = medians[0]
        row["recompiled_median_step_seconds_each"] = medians
        # As `machine_per_step`, `per_step` and `op_profile`, for each recompilation.
        row["recompiled_machine_per_step_each"] = each("machine_per_step")
        row["recompiled_per_step_each"] = each("per_step")
        if settings.op_profile:
            row["recompiled_op_profile_each"] = each("op_profile")
    row["part_seconds"] = _part_seconds(model, next(iterator), settings.steps)
    return row


def _time_compiled_step(step, settings):
    """Times `settings.steps` calls of `step` with this process's and the machine's CPU use.

    With `settings.op_profile`, then as many calls again under the profiler
    (the same compiled step, so a slow one is still slow): which ops take
    the time.
    """
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    machine_before = _machine_cpu_seconds()
    times = _call_seconds(step, settings.steps)
    timing = {
        "step_seconds": times,
        "machine_per_step": _machine_per_step(machine_before, _machine_cpu_seconds(), len(times)),
        "per_step": _usage_per_step(
            usage_before, resource.getrusage(resource.RUSAGE_SELF), len(times)
        ),
    }
    if settings.op_profile:
        profiled = []
        space = op_profile.profile(lambda: profiled.extend(_call_seconds(step, 1)), settings.steps)
        timing["op_profile"] = dict(
            op_profile.summarize(space, settings.steps),
            median_step_seconds=statistics.median(profiled),
        )
    return timing


def _call_seconds(call, repeats):
    """Wall seconds of each of `repeats` calls of `call()` (which waits for its result)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def _part_seconds(model, batch, repeats):
    """Median seconds of the parts of a step, each compiled on its own.

    Timed after the steps, so that a slow process can be told apart: every
    part slower (the process or the machine) or one part (a kernel).
    """
    import tensorflow as tf

    from keras_adr import graph, losses

    x, y = batch
    x_adv = model.adversarial_examples(x, y)

    def objective_gradients(x, y, x_adv):
        with tf.GradientTape() as tape:
            loss = model.compute_adr_loss(x, y, x_adv)[0]
        return tape.gradient(loss, model.trainable_variables)

    def global_compactness_gradient(y, z, z_adv):
        with tf.GradientTape() as tape:
            tape.watch(z_adv)
            term = tf.reduce_sum(losses.global_compactness_per_example(y, z, z_adv))
        return tape.gradient(term, z_adv)

    # Inference mode: taking the codes must not move BatchNorm statistics.
    (_, z), (_, z_adv) = model.clean_and_adversarial_outputs(x, x_adv, training=False)
    z, z_adv = (tf.cast(graph.flatten_batch(t), tf.float32) for t in (z, z_adv))
    parts = {
        "attack": (tf.function(model.adversarial_examples), (x, y)),
        "objective_and_gradients": (tf.function(objective_gradients), (x, y, x_adv)),
        "inference_forward": (tf.function(lambda x: model(x, training=False)), (x,)),
        "global_compactness_and_gradient": (
            tf.function(global_compactness_gradient),
            (tf.cast(y, tf.int32), z, z_adv),
        ),
    }
    return {
        name: round(_median_call_seconds(function, args, repeats), 5)
        for name, (function, args) in parts.items()
    }


def _median_call_seconds(function, args, repeats):
    """Median wall seconds of `function(*args)` until its outputs are on the host."""
    import numpy as np
    import tensorflow as tf

    call = lambda: [np.asarray(t) for t in tf.nest.flatten(function(*args))]
    _call_seconds(call, 2)  # Traces, then warms up.
    return statistics.median(_call_seconds(call, repeats))


# The first fields of the `cpu` line of /proc/stat, in clock ticks (proc(5)).
_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _machine_cpu_seconds(path="/proc/stat"):
    """Seconds every CPU of the machine spent in each state since boot, or None.

    `steal` is time the hypervisor gave this VM's CPUs to someone else: a
    process that gets less than its cores then shows it here.
    """
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return {name: int(value) / ticks for name, value in zip(_PROC_STAT_FIELDS, fields[1:])}


def _machine_per_step(before, after, steps):
    """Machine-wide CPU seconds per timed step in each state (all CPUs together)."""
    if before is None or after is None:
        return None
    return {name: round((after[name] - before[name]) / steps, 4) for name in before}


def _usage_per_step(before, after, steps):
    """What the timed steps cost the process beyond wall time, per step.

    A process that spends its time in the kernel (system CPU seconds, page
    faults from memory the allocator returned to the system and maps again)
    or waits (context switches) shows it here, not in the kernels it runs.
    """
    delta = lambda name: (getattr(after, name) - getattr(before, name)) / steps
    return {
        "user_cpu_seconds": round(delta("ru_utime"), 5),
        "system_cpu_seconds": round(delta("ru_stime"), 5),
        "minor_page_faults": round(delta("ru_minflt"), 1),
        "voluntary_context_switches": round(delta("ru_nvcsw"), 1),
        "involuntary_context_switches": round(delta("ru_nivcsw"), 1),
    }


def _child_main():
    policy, defense = flags.FLAGS.child.split(":")
    print(_ROW_MARK + json.dumps(measure(policy, defense, _settings_from_flags())), flush=True)


def run_child(policy, defense, settings):
    """Runs one measurement in a new process; returns its row with the oneDNN kernels."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.precision_speed",
        f"--child={policy}:{defense}",
        f"--steps={settings.steps}",
        f"--warmup={settings.warmup}",
        f"--batch_size={settings.batch_size}",
        f"--attack_steps={settings.attack_steps}",
        f"--threads={settings.threads}",
        f"--inter_op_threads={settings.inter_op_threads}",
        f"--recompilations={settings.recompilations}",
        f"--op_profile={settings.op_profile}",
        f"--no_aslr={settings.no_aslr}",
        f"--global_compactness_features={settings.global_compactness_features}",
    ]
    if settings.no_aslr:
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


# --- Every configuration ----------------------------------------------------------


def run_rounds(policies, defenses, processes, settings, rows_dir=None, log=print):
    """`processes` rows per (policy, defense), one new process each, round by round.

    Every round runs every configuration once, so that a change of machine
    load hits them alike.

    Args:
        policies: Keras dtype policies.
        defenses: Preset names.
        processes: Processes (runs) per configuration.
        settings: A `Settings`.
        rows_dir: If given, every row is written there as it finishes, and a
            row found there is taken instead of measured again (a rerun
            resumes; rows of other settings must not be in it).
        log: Called with one line per finished row.

    Returns:
        The rows, in the order they were measured.
    """
    if rows_dir:
        os.makedirs(rows_dir, exist_ok=True)
    rows = []
    for run in range(processes):
        for defense in defenses:
            for policy in policies:
                path = rows_dir and os.path.join(
                    rows_dir, _row_name(policy, defense, run) + ".json"
                )
                row = results_io.read_json(path) if path else None
                if row is None:
                    row = run_child(policy, defense, settings)
                    row.update(
                        run=run,
                        batch_size=settings.batch_size,
                        attack_steps=settings.attack_steps,
                        steps=settings.steps,
                        warmup=settings.warmup,
                    )
                    if path:
                        results_io.write_json_atomic(path, row)
                log(
                    f"{policy:15s} {defense:8s} run {run}: {row['median_step_seconds']:.3f} s/step "
                    f"{row['onednn_kernels']}"
                )
                rows.append(row)
    return rows


def analyse(rows):
    """Per (defense, policy) statistics over processes, speed-ups and issue 14's targets.

    Each process counts with the median of its timed steps. JSON-serialisable:
    `configurations` (one entry per (defense, policy), defenses and policies
    in the order of the rows), `adr_pgd_over_pgd_at` (per policy, ratio of
    the medians over processes) and `targets` (each with its `value`, the
    `limit` and whether it is `met`).
    """
    by_config = collections.defaultdict(list)
    for row in rows:
        by_config[(row["defense"], row["policy"])].append(row["median_step_seconds"])
    defenses = list(dict.fromkeys(row["defense"] for row in rows))
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    median = {key: statistics.median(values) for key, values in by_config.items()}
    configurations = []
    for defense in defenses:
        base = median.get((defense, BASE_POLICY))
        for policy in policies:
            values = sorted(by_config.get((defense, policy), []))
            if not values:
                continue
            configurations.append(
                {
                    "defense": defense,
                    "policy": policy,
                    "processes": len(values),
                    "median_step_seconds": median[(defense, policy)],
                    "min_step_seconds": values[0],
                    "max_step_seconds": values[-1],
                    "process_median_step_seconds": values,
                    # float32's median over this median, and over the slowest process.
                    "speedup_over_float32": base / median[(defense, policy)] if base else None,
                    "slowest_process_speedup_over_float32": base / values[-1] if base else None,
                }
            )
    ratios = {
        policy: median[("adr_pgd", policy)] / median[("pgd_at", policy)]
        for policy in policies
        if ("adr_pgd", policy) in median and ("pgd_at", policy) in median
    }
    # The two defenses' processes of one round ran back to back: their ratio
    # is less exposed to drifts of the machine than the ratio of medians.
    by_round = collections.defaultdict(dict)
    for row in rows:
        if "run" in row:
            by_round[(row["policy"], row["run"])][row["defense"]] = row["median_step_seconds"]
    paired = collections.defaultdict(list)
    for (policy, _), times in by_round.items():
        if "adr_pgd" in times and "pgd_at" in times:
            paired[policy].append(times["adr_pgd"] / times["pgd_at"])
    targets = []
    for entry in configurations:
        if entry["policy"] == TARGET_POLICY and entry["slowest_process_speedup_over_float32"]:
            value = entry["slowest_process_speedup_over_float32"]
            targets.append(
                {
                    "target": f"every {TARGET_POLICY} process of {entry['defense']} at least "
                    f"{MIN_SPEEDUP}x faster than {BASE_POLICY}'s median",
                    "value": value,
                    "limit": MIN_SPEEDUP,
                    "met": value >= MIN_SPEEDUP,
                }
            )
    for policy, value in ratios.items():
        targets.append(
            {
                "target": f"adr_pgd <= {MAX_ADR_RATIO} x pgd_at in {policy} "
                "(medians over processes)",
                "value": value,
                "limit": MAX_ADR_RATIO,
                "met": value <= MAX_ADR_RATIO,
            }
        )
    return {
        "base_policy": BASE_POLICY,
        "configurations": configurations,
        "adr_pgd_over_pgd_at": ratios,
        "adr_pgd_over_pgd_at_per_round": {
            policy: {"rounds": len(values), "median": statistics.median(values)}
            for policy, values in paired.items()
        },
        "targets": targets,
    }


# --- Markdown ---------------------------------------------------------------------


def markdown_lines(analysis):
    """The tables and the targets of `analyse(rows)`, as markdown lines."""
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    lines = results_io.markdown_table(
        [
            "defense",
            "precision",
            "processes",
            "median s/step",
            "min",
            "max",
            f"speed-up over {analysis['base_policy']} (medians)",
            "speed-up of the slowest process",
            "every process (s/step)",
        ],
        [
            [
                c["defense"],
                c["policy"],
                c["processes"],
                f"{c['median_step_seconds']:.3f}",
                f"{c['min_step_seconds']:.3f}",
                f"{c['max_step_seconds']:.3f}",
                fmt(c["speedup_over_float32"], ".2f"),
                fmt(c["slowest_process_speedup_over_float32"], ".2f"),
                ", ".join(f"{v:.3f}" for v in c["process_median_step_seconds"]),
            ]
            for c in analysis["configurations"]
        ],
        align="llrrrrrrl",
    )
    lines += [
        "",
        "Per process the median of its timed steps; median, min and max over the "
        f"processes of each configuration. Speed-up: {analysis['base_policy']}'s median "
        "over this configuration's median, and over its slowest process.",
    ]
    if analysis["adr_pgd_over_pgd_at"]:
        per_round = analysis.get("adr_pgd_over_pgd_at_per_round", {})
        lines += [""]
        lines += results_io.markdown_table(
            ["precision", "adr_pgd / pgd_at (medians)", "per round: median (rounds)"],
            [
                [
                    p,
                    f"{r:.3f}",
                    f"{per_round[p]['median']:.3f} ({per_round[p]['rounds']})"
                    if p in per_round
                    else "-",
                ]
                for p, r in analysis["adr_pgd_over_pgd_at"].items()
            ],
        )
        lines += [
            "",
            "Per round: the median over rounds of the ratio of the two processes of "
            "one round, which ran back to back.",
        ]
    if analysis["targets"]:
        lines += ["", "Targets of issue 14:", ""]
        lines += [
            f"- {t['target']}: {t['value']:.3f} -> **{'met' if t['met'] else 'not met'}**"
            for t in analysis["targets"]
        ]
    return lines


def kernel_lines(rows):
    """Markdown list: per policy and set of oneDNN implementations, the processes' times."""
    kernel_sets = collections.defaultdict(list)
    for row in rows:
        key = ", ".join(sorted(k for k in row["onednn_kernels"] if not k.startswith("reorder")))
        kernel_sets[(row["policy"], key)].append(f"{row['median_step_seconds']:.3f}")
    return [
        f"- {policy}: {key or '(none)'} -> {', '.join(times)} s/step"
        for (policy, key), times in sorted(kernel_sets.items())
    ]


_PARTS = ("attack", "objective_and_gradients", "global_compactness_and_gradient")


def part_lines(rows):
    """Markdown table: per process, its step time beside its parts' times and CPU use.

    Rows measured before the parts were timed (no `part_seconds`) are left out;
    no rows with parts give no lines.
    """
    timed = [row for row in rows if "part_seconds" in row]
    if not timed:
        return []
    order = {
        key: i for i, key in enumerate(dict.fromkeys((r["defense"], r["policy"]) for r in timed))
    }
    timed.sort(key=lambda r: (order[(r["defense"], r["policy"])], r["median_step_seconds"]))
    ms = lambda seconds: f"{1000 * seconds:.1f}"
    return results_io.markdown_table(
        [
            "defense",
            "precision",
            "step (ms)",
            "recompiled steps (ms)",
            *(f"{part} (ms)" for part in _PARTS),
            "user CPU s/step",
            "system CPU s/step",
            "machine idle s/step",
            "steal s/step",
            "other processes s/step",
        ],
        [
            [
                r["defense"],
                r["policy"],
                ms(r["median_step_seconds"]),
                ", ".join(ms(seconds) for seconds in _recompiled_medians(r)) or "-",
                *(ms(r["part_seconds"][part]) for part in _PARTS),
                f"{r['per_step']['user_cpu_seconds']:.3f}",
                f"{r['per_step']['system_cpu_seconds']:.3f}",
                *_machine_columns(r),
            ]
            for r in timed
        ],
        align="llrrrrrrrrrr",
    )


# A compilation is slow when its median step takes this many times the median
# over every compilation of its configuration; it is left out as disturbed when
# other processes used this many CPU seconds per step while it was timed.
SLOW_FACTOR = 1.25
DISTURBED_CPU_SECONDS = 0.02


class _Compilation(NamedTuple):
    """One timed compilation of the training step, classified within its configuration."""

    seconds: float  # median step seconds
    counted: bool  # timed while no other process was busy (or unknown: older rows)
    slow: bool  # seconds above SLOW_FACTOR x the configuration's median
    profile: dict  # its `op_profile`, or None


def _timed_compilations(row):
    """`(median step seconds, other processes' CPU s/step or None, op profile or None)`
    of each compilation of a row, the first one first."""
    medians = _recompiled_medians(row)
    others = lambda key: row.get(key) or [None] * len(medians)
    return [
        (seconds, _other_cpu_seconds(machine, usage), profile)
        for seconds, machine, usage, profile in zip(
            [row["median_step_seconds"], *medians],
            [row.get("machine_per_step"), *others("recompiled_machine_per_step_each")],
            [row.get("per_step"), *others("recompiled_per_step_each")],
            [row.get("op_profile"), *others("recompiled_op_profile_each")],
        )
    ]


def _other_cpu_seconds(machine, usage):
    if not machine or not usage:
        return None
    busy = machine["user"] + machine["nice"] + machine["system"]
    return max(busy - usage["user_cpu_seconds"] - usage["system_cpu_seconds"], 0.0)


def _classified_compilations(rows):
    """Per (defense, policy): the median over its counted compilations, and per
    process the list of its `_Compilation`s."""
    by_config = collections.defaultdict(list)
    for row in rows:
        by_config[(row["defense"], row["policy"])].append(_timed_compilations(row))
    result = {}
    for key, processes in by_config.items():
        timed = [timing for each in processes for timing in each]
        undisturbed = lambda other: other is None or other < DISTURBED_CPU_SECONDS
        counted = [seconds for seconds, other, _ in timed if undisturbed(other)]
        median = statistics.median(counted or [seconds for seconds, _, _ in timed])
        result[key] = (
            median,
            [
                [
                    _Compilation(seconds, undisturbed(other), seconds > SLOW_FACTOR * median, p)
                    for seconds, other, p in each
                ]
                for each in processes
            ],
        )
    return result


def slow_compilations(rows):
    """Per (defense, policy): how many compilations of the step were slow.

    A compilation counts unless other processes were busy while it was timed
    (unknown in rows of older runs: those count). `first_slow` counts the
    processes whose first compilation was slow, `faster_of_two_slow` those
    whose faster of the first two was: what `FastestCompilation(2)` would
    have kept.

    Returns:
        A list of dicts (JSON-serialisable), in the order of the rows; the
        median is over the compilations counted.
    """
    result = []
    for (defense, policy), (median, processes) in _classified_compilations(rows).items():
        counted = [c for each in processes for c in each if c.counted]
        pairs = [
            each[:2] for each in processes if len(each) >= 2 and all(c.counted for c in each[:2])
        ]
        result.append(
            {
                "defense": defense,
                "policy": policy,
                "median_step_seconds": median,
                "compilations": len(counted),
                "disturbed": sum(map(len, processes)) - len(counted),
                "slow": sum(c.slow for c in counted),
                "processes_with_two": len(pairs),
                "first_slow": sum(first.slow for first, _ in pairs),
                "faster_of_two_slow": sum(first.slow and second.slow for first, second in pairs),
            }
        )
    return result


def slow_op_differences(rows, top=5):
    """The op types whose time differs most between slow and other compilations.

    Per (defense, policy) with both kinds among the undisturbed profiled
    compilations (`--op_profile`): for each op type the median over slow
    compilations and over the others of its self seconds per step (0 where
    it is not among a profile's longest op types), largest difference first.
    Slow is as in `slow_compilations`.

    Returns:
        A list of dicts (JSON-serialisable): `defense`, `policy`, `slow`,
        `others` (how many compilations) and `ops`: `[op type, median slow,
        median others]`.
    """
    result = []
    for (defense, policy), (_, processes) in _classified_compilations(rows).items():
        profiled = [c for each in processes for c in each if c.counted and c.profile]
        slow = [c.profile for c in profiled if c.slow]
        others = [c.profile for c in profiled if not c.slow]
        if not slow or not others:
            continue
        ops = {op for c in profiled for op in c.profile["op_self_seconds"]}
        seconds = lambda profiles, op: statistics.median(
            p["op_self_seconds"].get(op, 0.0) for p in profiles
        )
        differences = sorted(
            ([op, seconds(slow, op), seconds(others, op)] for op in ops),
            key=lambda item: -abs(item[1] - item[2]),
        )
        result.append(
            {
                "defense": defense,
                "policy": policy,
                "slow": len(slow),
                "others": len(others),
                "ops": differences[:top],
            }
        )
    return result


def slow_op_lines(rows):
    """Markdown table of `slow_op_differences(rows)`; none without both kinds."""
    table = [
        [
            c["defense"],
            c["policy"],
            op,
            f"{1000 * slow:.1f}",
            f"{1000 * other:.1f}",
            f"{c['slow']}",
            f"{c['others']}",
        ]
        for c in slow_op_differences(rows)
        for op, slow, other in c["ops"]
    ]
    if not table:
        return []
    return results_io.markdown_table(
        [
            "defense",
            "precision",
            "op type",
            "slow compilations (ms per step, median)",
            "the others (ms per step, median)",
            "slow compilations",
            "others",
        ],
        table,
        align="lllrrrr",
    )


def slow_compilation_lines(rows):
    """Markdown table of `slow_compilations(rows)`; none without recompiled steps."""
    if not any(_recompiled_medians(row) for row in rows):
        return []
    return results_io.markdown_table(
        [
            "defense",
            "precision",
            "median step (ms)",
            "compilations timed",
            "left out (other processes busy)",
            f"slow (> {SLOW_FACTOR}x median)",
            "processes: first compilation slow",
            "faster of the first two slow",
        ],
        [
            [
                c["defense"],
                c["policy"],
                f"{1000 * c['median_step_seconds']:.1f}",
                c["compilations"],
                c["disturbed"],
                c["slow"],
                f"{c['first_slow']} of {c['processes_with_two']}",
                f"{c['faster_of_two_slow']} of {c['processes_with_two']}",
            ]
            for c in slow_compilations(rows)
        ],
        align="llrrrrrr",
    )


_PROFILED_OPS = 6  # op types per process in the summary


def op_lines(rows):
    """Markdown table: per process, its profiled step and the op types that took longest."""
    profiled = [row for row in rows if "op_profile" in row]
    if not profiled:
        return []
    profiled.sort(key=lambda r: (r["defense"], r["policy"], r["median_step_seconds"]))
    ms = lambda seconds: f"{1000 * seconds:.1f}"
    return results_io.markdown_table(
        [
            "defense",
            "precision",
            "step (ms)",
            "profiled step (ms)",
            "ops busy (ms)",
            "ops on 2+ threads (ms)",
            f"longest {_PROFILED_OPS} op types (self ms per step)",
        ],
        [
            [
                r["defense"],
                r["policy"],
                ms(r["median_step_seconds"]),
                ms(r["op_profile"]["median_step_seconds"]),
                ms(r["op_profile"]["op_busy_seconds"]),
                ms(r["op_profile"]["op_overlap_seconds"]),
                ", ".join(
                    f"{op} {ms(seconds)}"
                    for op, seconds in sorted(
                        r["op_profile"]["op_self_seconds"].items(), key=lambda item: -item[1]
                    )[:_PROFILED_OPS]
                ),
            ]
            for r in profiled
        ],
        align="llrrrrl",
    )


def _recompiled_medians(row):
    """Median step seconds of each recompilation (rows of older runs: one or none)."""
    if "recompiled_median_step_seconds_each" in row:
        return row["recompiled_median_step_seconds_each"]
    if "recompiled_median_step_seconds" in row:
        return [row["recompiled_median_step_seconds"]]
    return []


def _threads_note(row):
    threads = lambda n: "TensorFlow's choice" if not n else str(n)
    if "inter_op_threads" not in row:
        return ""
    return (
        f" TensorFlow threads: intra-op {threads(row['intra_op_threads'])}, "
        f"inter-op {threads(row['inter_op_threads'])}."
    )


def _machine_columns(row):
    """Machine idle and steal seconds per step, and the CPU seconds of other processes."""
    machine = row.get("machine_per_step")
    if not machine:
        return ["-", "-", "-"]
    # Tick counts are coarse (10 ms): a small negative difference is rounding.
    other = _other_cpu_seconds(machine, row["per_step"])
    return [f"{machine['idle']:.3f}", f"{machine['steal']:.3f}", f"{other:.3f}"]


def _isa_note(row):
    isa = row.get("onednn_max_cpu_isa")
    return f" oneDNN's instruction sets capped at `ONEDNN_MAX_CPU_ISA={isa}`." if isa else ""


def _sampling_note(features):
    if features == 1.0:
        return ""
    return (
        f" Every ADR defense with `global_compactness_features={features:g}` (global "
        "compactness on that share of the latent features, drawn each step)."
    )


def summary(rows):
    """Markdown: per (defense, policy) the process medians and targets; per run the kernels."""
    lines = [
        "# Training-step time per precision, one process per run",
        "",
        "`python -m benchmarks.precision_speed` (see its docstring). `small_cnn`, batch "
        f"{rows[0].get('batch_size')}, PGD-{rows[0].get('attack_steps')} training "
        "attack; per process the median of its timed steps."
        + _sampling_note(rows[0].get("global_compactness_features", 1.0))
        + _threads_note(rows[0])
        + _isa_note(rows[0]),
        "",
        *markdown_lines(analyse(rows)),
        "",
        "## oneDNN implementations per process (created primitives)",
        "",
        *kernel_lines(rows),
    ]
    parts = part_lines(rows)
    if parts:
        lines += [
            "",
            "## Where each process spends a step",
            "",
            "After its timed steps each process times the same steps again with the "
            "training step compiled anew, once or more (recompiled steps), then parts of a "
            "step, each compiled on its own (median of as many calls as timed steps): the training "
            "attack, the objective with its gradients for fixed adversarial images, and global "
            "compactness with its gradient alone (the exact term on all features, float32, "
            "the latent codes of one batch). "
            "CPU seconds are the process's over its timed steps, per step; machine idle "
            "and steal (CPU time the hypervisor gave to other VMs) are over all CPUs, and "
            "other processes is the machine's busy time less this process's.",
            "",
            *parts,
        ]
    slow = slow_compilation_lines(rows)
    if slow:
        lines += [
            "",
            "## Slow compilations",
            "",
            "Every timed compilation of the training step (the first and the recompiled "
            f"ones): slow when its median step is above {SLOW_FACTOR}x the median over all "
            "compilations of its configuration; left out when other processes used "
            f"{DISTURBED_CPU_SECONDS} CPU s/step or more while it was timed. Per process, "
            "whether its first compilation was slow, and whether the faster of its first two "
            "was (what `keras_adr.callbacks.FastestCompilation(2)` keeps).",
            "",
            *slow,
        ]
    slow_ops = slow_op_lines(rows)
    if slow_ops:
        lines += [
            "",
            "## Which ops make a compilation slow (`--op_profile`)",
            "",
            "Over the undisturbed profiled compilations: the op types whose self time per "
            "step differs most between the slow compilations and the others (0 where an op "
            "type is not among a profile's longest ones).",
            "",
            *slow_ops,
        ]
    ops = op_lines(rows)
    if ops:
        lines += [
            "",
            "## Time per op type (`--op_profile`)",
            "",
            "The process's compiled step timed again under TensorFlow's profiler (which "
            "slows it): self time of each op type's kernels per step, how long some op ran "
            "(busy) and how long ops ran on two or more threads at once.",
            "",
            *ops,
        ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    f = flags.FLAGS
    if f.child:
        return _child_main()
    if not f.output_dir:
        raise app.UsageError("--output_dir is required (rows are written as they finish).")
    rows = run_rounds(
        f.policies,
        f.defenses,
        f.runs,
        _settings_from_flags(),
        rows_dir=os.path.join(f.output_dir, "rows"),
        log=lambda line: print(line, flush=True),
    )
    text = summary(rows)
    results_io.write_text(os.path.join(f.output_dir, "summary.md"), text)
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
