"""Rounds within a process of `benchmarks/precision_speed.py --rounds`: issue 30's targets.

Issue 30 saw, on an AMD EPYC with AVX512_BF16 and no AMX, bfloat16 rounds
of a process run at the speed of one thread while the other core sat idle,
and the next round of the same process run at full speed. Each round of a
row records the cores its process kept busy and the machine's busy cores
(`precision_speed_measure._round`), so that a one-core round (process
about 1 core, machine about as busy) is told apart from a round slowed by
another process (the machine busier than the process).

`analyse_rounds` checks the targets on the rounds of a free machine; the
`round_lines` table shows every round.
"""

import collections
import statistics

from benchmarks import results_io

# The precision compared and the one it is compared with (issue 14's targets in
# `precision_speed_report` too).
BASE_POLICY = "float32"
TARGET_POLICY = "mixed_bfloat16"
# Issue 30: every bfloat16 round of a free machine at least this many times
# faster than float32's median round, for every defense ...
MIN_ROUND_SPEEDUP = 1.6
# ... and every round of both precisions keeps at least this many cores busy
# (a normal round of a 2-core machine kept 1.4-1.8, a one-core round about 1).
MIN_ROUND_CORES = 1.3
# A round is of a free machine when the machine's busy cores exceed the
# process's by less than this (other processes' share; ticks are 10 ms).
MAX_OTHER_CORES = 0.2


def rounds_of(row):
    """The row's rounds of its first compilation (none for rows from before `--rounds`)."""
    return row.get("rounds") or []


def other_cores(record):
    """Cores the rest of the machine kept busy during a round, or None if unknown."""
    if "machine_busy_cores" not in record:
        return None
    return max(0.0, record["machine_busy_cores"] - record["process_cores"])


def is_free(record):
    """Whether nothing else ran on the machine during the round (unknown counts as busy)."""
    other = other_cores(record)
    return other is not None and other < MAX_OTHER_CORES


def analyse_rounds(rows):
    """Issue 30's targets over the free-machine rounds of `rows`.

    Returns a JSON-serialisable dict: per (defense, policy) the number of
    rounds and free rounds and the median step over the free rounds, and
    `targets` (each with `value`, `limit` and `met`); empty targets when
    the rows have no rounds.
    """
    free = collections.defaultdict(list)
    counts = collections.Counter()
    for row in rows:
        for record in rounds_of(row):
            key = (row["defense"], row["policy"])
            counts[key] += 1
            if is_free(record):
                free[key].append(record)
    configurations = [
        {
            "defense": defense,
            "policy": policy,
            "rounds": counts[(defense, policy)],
            "free_rounds": len(free[(defense, policy)]),
            "median_step_seconds": statistics.median(
                r["median_step_seconds"] for r in free[(defense, policy)]
            )
            if free[(defense, policy)]
            else None,
        }
        for defense, policy in counts
    ]
    targets = []
    for defense in dict.fromkeys(defense for defense, _ in counts):
        base = free.get((defense, BASE_POLICY))
        target = free.get((defense, TARGET_POLICY))
        if base and target:
            base_median = statistics.median(r["median_step_seconds"] for r in base)
            slowest = max(r["median_step_seconds"] for r in target)
            targets.append(
                {
                    "target": f"every free {TARGET_POLICY} round of {defense} at least "
                    f"{MIN_ROUND_SPEEDUP}x faster than {BASE_POLICY}'s median round",
                    "value": base_median / slowest,
                    "limit": MIN_ROUND_SPEEDUP,
                    "met": base_median / slowest >= MIN_ROUND_SPEEDUP,
                }
            )
        for policy in (BASE_POLICY, TARGET_POLICY):
            records = free.get((defense, policy))
            if records:
                fewest = min(r["process_cores"] for r in records)
                targets.append(
                    {
                        "target": f"every free {policy} round of {defense} keeps at least "
                        f"{MIN_ROUND_CORES} cores busy",
                        "value": fewest,
                        "limit": MIN_ROUND_CORES,
                        "met": fewest >= MIN_ROUND_CORES,
                    }
                )
    return {"configurations": configurations, "targets": targets}


def _round_cell(record):
    other = other_cores(record)
    machine = "-" if other is None else f"{record['machine_busy_cores']:.2f}"
    mark = "" if is_free(record) else " *"
    return f"{record['median_step_seconds']:.3f} ({record['process_cores']:.2f} / {machine}){mark}"


def round_lines(rows):
    """Markdown: every process's rounds, then the targets; empty without rounds."""
    rows = [row for row in rows if rounds_of(row)]
    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: (r["defense"], r["policy"], r.get("run", 0)))
    lines = results_io.markdown_table(
        ["defense", "precision", "process", "s/step of each round (process cores / machine busy)"],
        [
            [
                row["defense"],
                row["policy"],
                row.get("run", "-"),
                ", ".join(_round_cell(record) for record in rounds_of(row)),
            ]
            for row in ordered
        ],
        align="llrl",
    )
    lines += [
        "",
        "Each round: the median of its steps; the cores this process kept busy (CPU "
        "seconds over wall seconds) and the machine's busy cores. `*`: not a free "
        f"machine (other processes kept {MAX_OTHER_CORES} cores or more busy); left out "
        "of the targets.",
    ]
    targets = analyse_rounds(rows)["targets"]
    return lines + results_io.target_lines(
        "Targets of issue 30 (free-machine rounds):", targets, ".2f"
    )
