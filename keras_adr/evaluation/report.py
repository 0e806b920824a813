"""Reports: console text, `results.json` / `results.md` / the plot, and `autoattack.json`.

`format_summary` prints the headline, the per-attack table and the sanity
checks of a sweep, or the per-attack accuracies of an AutoAttack run;
`write_report` writes a sweep's files; `write_autoattack_result` writes an
AutoAttack run in RobustBench's model-card format beside ours.

Each writer publishes a *set* of files that is complete or absent
(`keras_adr.evaluation.result_set`).
"""

import io
import os

from keras_adr.evaluation import sanity
from keras_adr.evaluation.result_set import (  # noqa: F401 - re-exported
    IncompleteReportError,
    ReportWriteError,
    json_bytes,
    publish_set,
    read_set,
)
from keras_adr.evaluation.results import AutoAttackResult, as_sweep, robustbench_eps

REPORT_JSON = "results.json"
REPORT_MARKDOWN = "results.md"
REPORT_PLOT = "robust_accuracy_vs_epsilon.png"
ROBUSTBENCH_JSON = "autoattack.json"
REPORT_MARKER = "results.complete.json"
ROBUSTBENCH_MARKER = "autoattack.complete.json"


def _pct(value):
    return f"{100 * value:.2f}%"


def _all_attacks(sweep):
    names = []
    for r in sweep.results:
        names += [a for a in r.attacks if a not in names]
    return names


def format_summary(results, checks=None):
    """Readable console text: headline, per-attack table, sanity checks.

    Args:
        results: A `RobustnessResult`, `SweepResult` or list of results, or
            an `AutoAttackResult`.
        checks: The `sanity_checks` results, or None.
    """
    if isinstance(results, AutoAttackResult):
        return _autoattack_summary(results, checks)
    sweep = as_sweep(results)
    headline = sweep.headline
    names = _all_attacks(sweep)
    lines = [
        f"Robustness evaluation ({headline.norm}, {headline.num_examples} examples, "
        f"restarts={headline.restarts})",
        f"  clean accuracy:               {_pct(headline.clean_accuracy)}",
        f"  worst-case robust accuracy:   {_pct(headline.robust_accuracy)} at epsilon "
        f"{headline.epsilon:g} (per example, over {', '.join(headline.attacks)})",
        "",
    ]
    width = max([len(n) for n in names] + [9])
    header = f"  {'epsilon':>8}  {'clean':>8}  " + "  ".join(f"{n:>{width}}" for n in names)
    if not headline.standalone_attacks:
        lines += [
            "  Each attack ran on the examples still standing; its column is the accuracy after it."
        ]
    lines += [header + f"  {'worst case':>10}"]
    for r in sweep.results:
        cells = "  ".join(
            f"{_pct(r.attack_accuracy[n]) if n in r.attack_accuracy else '-':>{width}}"
            for n in names
        )
        lines.append(
            f"  {r.epsilon:>8g}  {_pct(r.clean_accuracy):>8}  {cells}  "
            f"{_pct(r.robust_accuracy):>10}"
        )
    return "\n".join(lines + _checks_lines(checks))


def _checks_lines(checks):
    if checks is None:
        return []
    lines = ["", "Sanity checks:"]
    for c in checks:
        mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[c.status]
        lines.append(f"  [{mark}] {c.name}: {c.message}")
    if any(c.failed for c in checks):
        lines += [
            "",
            "!!! SANITY CHECKS FAILED: the robust accuracy above is NOT "
            "trustworthy (possible gradient masking or a broken evaluation).",
        ]
    return lines


def _markdown(sweep, checks, metadata):
    headline = sweep.headline
    names = _all_attacks(sweep)
    lines = ["# Robustness evaluation", ""]
    if metadata:
        lines += [f"- {k}: `{v}`" for k, v in metadata.items()]
    lines += [
        f"- norm: {headline.norm}; examples: {headline.num_examples}; restarts: "
        f"{headline.restarts}; APGD-T targets: {headline.apgd_targets}; seed: {headline.seed}",
        f"- **worst-case robust accuracy: {_pct(headline.robust_accuracy)} at epsilon "
        f"{headline.epsilon:g}** (clean {_pct(headline.clean_accuracy)}); an example counts as "
        "robust only if it is classified correctly under every attack and restart.",
        *(
            []
            if headline.standalone_attacks
            else [
                "- Each attack ran only on the examples every earlier one left correct, in "
                "the order of the columns; a column is the accuracy after that attack."
            ]
        ),
        "",
        "| epsilon | clean | " + " | ".join(names) + " | worst case |",
        "|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for r in sweep.results:
        cells = " | ".join(
            _pct(r.attack_accuracy[n]) if n in r.attack_accuracy else "-" for n in names
        )
        lines.append(
            f"| {r.epsilon:g} | {_pct(r.clean_accuracy)} | {cells} | "
            f"**{_pct(r.robust_accuracy)}** |"
        )
    lines += ["", "## Sanity checks", "", "| check | status | details |", "|---|---|---|"]
    for c in checks:
        status = "**FAILED**" if c.failed else c.status
        lines.append(f"| {c.name} | {status} | {c.message.replace('|', '/')} |")
    if any(c.failed for c in checks):
        lines += ["", "**Sanity checks failed: the numbers above are not trustworthy.**"]
    return "\n".join(lines) + "\n"


def _plot(sweep):
    """The PNG bytes of the sweep's plot."""
    # A bare Figure renders PNG with the Agg canvas: no pyplot, no global
    # backend switch, no display needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    epsilons = sweep.epsilons
    for name in _all_attacks(sweep):
        points = [
            (r.epsilon, r.attack_accuracy[name]) for r in sweep.results if name in r.attack_accuracy
        ]
        axes.plot(*zip(*points), linestyle="--", marker=".", linewidth=1, label=name)
    axes.plot(
        epsilons,
        sweep.robust_accuracies,
        color="black",
        marker="o",
        linewidth=2,
        label="worst case",
    )
    axes.axhline(sweep.headline.clean_accuracy, color="grey", linestyle=":", label="clean")
    axes.set_xlabel(f"epsilon ({sweep.headline.norm})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"Robust accuracy vs epsilon ({sweep.headline.num_examples} examples)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(results, output_dir, *, checks=None, metadata=None):
    """Writes `results.json`, `results.md` and `robust_accuracy_vs_epsilon.png`.

    The three files and the marker `results.complete.json` (which records
    `metadata`) are published together, replacing the previous set only
    once the new one is complete on disk (see the module docstring).

    Args:
        results: A `RobustnessResult`, `SweepResult` or list of results.
        output_dir: Directory to write to (created if missing).
        checks: The `sanity_checks` results; computed if None.
        metadata: Optional JSON-serialisable dict (model path, dataset, ...).

    Returns:
        `{"json": path, "markdown": path, "plot": path}`.

    Raises:
        ReportWriteError: If the set cannot be written (e.g. a full disk);
            the message names the directory and the bytes needed, and the
            previous set is unchanged.
    """
    sweep = as_sweep(results)
    if checks is None:
        checks = sanity.sanity_checks(sweep)
    payload = {
        "metadata": dict(metadata or {}),
        **sweep.to_dict(),
        "sanity_checks": [c.to_dict() for c in checks],
        "sanity_checks_passed": not any(c.failed for c in checks),
    }
    files = {
        REPORT_JSON: json_bytes(payload),
        REPORT_MARKDOWN: _markdown(sweep, checks, metadata).encode("utf-8"),
        REPORT_PLOT: _plot(sweep),
    }
    publish_set(output_dir, files, REPORT_MARKER, metadata)
    return {
        "json": os.path.join(output_dir, REPORT_JSON),
        "markdown": os.path.join(output_dir, REPORT_MARKDOWN),
        "plot": os.path.join(output_dir, REPORT_PLOT),
    }


def read_report(output_dir, marker_name=REPORT_MARKER):
    """`result_set.read_set` of a `write_report` set (or, with `ROBUSTBENCH_MARKER`, an
    AutoAttack one): its completion marker, after checking every file against it.

    Raises:
        IncompleteReportError: If the marker is missing or a file does not match it.
    """
    return read_set(output_dir, marker_name)


def _autoattack_summary(result, checks):
    lines = [
        f"AutoAttack ({result.version}, {result.norm}, epsilon "
        f"{robustbench_eps(result.epsilon)}, {result.num_examples} examples)",
        f"  clean accuracy:       {100 * result.clean_accuracy:.2f}%",
    ]
    for name in result.attacks:
        lines.append(
            f"  after {name:<14} {100 * result.accuracy_after[name]:.2f}%  "
            f"({result.attack_seconds[name]:.1f}s)"
        )
    lines.append(f"  AutoAttack accuracy:  {100 * result.robust_accuracy:.2f}%")
    if checks is None:
        lines += [f"  check {key}: {value}" for key, value in result.checks.items()]
    return "\n".join(lines + _checks_lines(checks))


def write_autoattack_result(
    result, output_dir, *, checks=None, metadata=None, **robustbench_fields
):
    """Writes `autoattack.json`: RobustBench's fields and ours (with `broken_by`).

    Published with its completion marker `autoattack.complete.json` (which
    records `metadata`), as `write_report` publishes its set.

    Args:
        result: An `AutoAttackResult`.
        output_dir: Directory to write to (created if missing).
        checks: The `sanity_checks` results; computed if None.
        metadata: Optional JSON-serialisable dict the marker records.
        **robustbench_fields: `name`, `defense`, `dataset` of the model card.

    Returns:
        The path written.

    Raises:
        ReportWriteError: As `write_report`.
    """
    if checks is None:
        checks = sanity.sanity_checks(result)
    payload = {
        **result.robustbench(**robustbench_fields),
        "keras_adr": {
            **result.to_dict(),
            "sanity_checks": [c.to_dict() for c in checks],
            "sanity_checks_passed": not any(c.failed for c in checks),
        },
    }
    publish_set(output_dir, {ROBUSTBENCH_JSON: json_bytes(payload)}, ROBUSTBENCH_MARKER, metadata)
    return os.path.join(output_dir, ROBUSTBENCH_JSON)
