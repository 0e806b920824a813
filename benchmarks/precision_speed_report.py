"""The summary of `benchmarks/precision_speed.py`: statistics over processes and issue 14's targets.

`analyse` reduces the rows (one per process) to per-configuration
statistics, the `adr_pgd` / `pgd_at` ratios and the targets, met or not;
the `*_lines` functions and `summary` write them as markdown.
`benchmarks/speed.py` uses `analyse`, `markdown_lines` and `kernel_lines`
for its precision section.
"""

import collections
import statistics

from benchmarks import precision_speed_compilations as compilations
from benchmarks import precision_speed_rounds, results_io
from benchmarks.precision_speed_rounds import BASE_POLICY, TARGET_POLICY

# Issue 14's targets: every process of TARGET_POLICY at least MIN_SPEEDUP
# times faster than the median process of BASE_POLICY, for every defense;
# and, in every policy, `adr_pgd`'s median at most MAX_ADR_RATIO x `pgd_at`'s.
MIN_SPEEDUP = 1.7
MAX_ADR_RATIO = 1.05


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
    return lines + results_io.target_lines("Targets of issue 14:", analysis["targets"])


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
                ", ".join(ms(seconds) for seconds in compilations.recompiled_medians(r)) or "-",
                *(ms(r["part_seconds"][part]) for part in _PARTS),
                f"{r['per_step']['user_cpu_seconds']:.3f}",
                f"{r['per_step']['system_cpu_seconds']:.3f}",
                *_machine_columns(r),
            ]
            for r in timed
        ],
        align="llrrrrrrrrrr",
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
    other = compilations.other_cpu_seconds(machine, row["per_step"])
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
    rounds = precision_speed_rounds.round_lines(rows)
    if rounds:
        lines += ["", "## Rounds within each process (`--rounds`)", "", *rounds]
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
    slow = compilations.slow_compilation_lines(rows)
    if slow:
        lines += [
            "",
            "## Slow compilations",
            "",
            "Every timed compilation of the training step (the first and the recompiled "
            f"ones): slow when its median step is above {compilations.SLOW_FACTOR}x the "
            "median over all compilations of its configuration; left out when other "
            f"processes used {compilations.DISTURBED_CPU_SECONDS} CPU s/step or more while "
            "it was timed. Per process, whether its first compilation was slow, and whether "
            "the faster of its first two was (what "
            "`keras_adr.callbacks.FastestCompilation(2)` keeps).",
            "",
            *slow,
        ]
    slow_ops = compilations.slow_op_lines(rows)
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
