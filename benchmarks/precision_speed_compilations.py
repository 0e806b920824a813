"""Slow compilations of the training step in `precision_speed` rows, and which ops differ.

Each process of `benchmarks/precision_speed.py` times its compiled step, then
compiles it anew and times it again (`--recompilations`). These functions
classify every timed compilation within its (defense, policy): slow, or left
out because other processes were busy meanwhile, and compare the op
profiles of slow and other compilations (`--op_profile`).
"""

import collections
import statistics
from typing import NamedTuple

from benchmarks import results_io

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
    medians = recompiled_medians(row)
    others = lambda key: row.get(key) or [None] * len(medians)
    return [
        (seconds, other_cpu_seconds(machine, usage), profile)
        for seconds, machine, usage, profile in zip(
            [row["median_step_seconds"], *medians],
            [row.get("machine_per_step"), *others("recompiled_machine_per_step_each")],
            [row.get("per_step"), *others("recompiled_per_step_each")],
            [row.get("op_profile"), *others("recompiled_op_profile_each")],
        )
    ]


def other_cpu_seconds(machine, usage):
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
    if not any(recompiled_medians(row) for row in rows):
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


def recompiled_medians(row):
    """Median step seconds of each recompilation (rows of older runs: one or none)."""
    if "recompiled_median_step_seconds_each" in row:
        return row["recompiled_median_step_seconds_each"]
    if "recompiled_median_step_seconds" in row:
        return [row["recompiled_median_step_seconds"]]
    return []
