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

This module is the program (flags, the child processes, the rounds); one
process's measurement is `precision_speed_measure.py`, the summary and
issue 14's targets `precision_speed_report.py`, the slow compilations
`precision_speed_compilations.py`. `benchmarks/speed.py` runs the same
measurement as its `precision` section (`run_rounds` from here, `analyse`
and the markdown helpers from the report; the default policies and
defenses are this module's `DEFAULT_POLICIES` and `DEFAULT_DEFENSES`).

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
import subprocess
import sys

from absl import app, flags

if not __package__:  # `python benchmarks/precision_speed.py`: import as `python -m` would.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import results_io  # noqa: E402
from benchmarks.precision_speed_measure import measure  # noqa: E402
from benchmarks.precision_speed_report import summary  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The defaults of this script and of `speed.py`'s precision section.
DEFAULT_POLICIES = ("float32", "mixed_bfloat16")
DEFAULT_DEFENSES = ("pgd_at", "adr_pgd")
DEFAULT_PROCESSES = 8

_ROW_MARK = "PRECISION_SPEED_ROW "
# oneDNN v3 verbose line of a created primitive:
# onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx10_1_512_amx,...
_ONEDNN_CREATE = re.compile(r"onednn_verbose,(?:v\d+,)?primitive,create[^,]*,cpu,([^,]+),([^,]+),")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How every process measures (the same for every configuration)."""

    steps: int = 16  # timed training steps per round
    rounds: int = 1  # rounds of timed steps per process (issue 30: the speed changes between them)
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
    flags.DEFINE_integer("steps", defaults.steps, "Timed training steps per round.")
    flags.DEFINE_integer(
        "rounds",
        defaults.rounds,
        "Rounds of --steps timed steps per process, each with its own cores and machine load.",
    )
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
        rounds=f.rounds,
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
        f"--rounds={settings.rounds}",
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
