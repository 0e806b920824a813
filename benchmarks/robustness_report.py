"""The robustness benchmark's summary: `<preset>.json`, `.md` and `.png` from the finished rows."""

import dataclasses
import os

import numpy as np
from absl import logging

from benchmarks import results_io
from benchmarks.robustness_frontier_report import write_frontier_summary
from benchmarks.robustness_presets import BASE_PRECISION, fingerprint
from benchmarks.robustness_stats import (
    pooled_pair,
    precision_comparison,
    row_pairs,
    sanity_line,
    seed_summary,
    variant_pairs,
    verdict,
)


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(
    preset_name, preset, rows, results, seeds, verdict_, total_seconds, comparison=None, pairs=()
):
    by_name = {r["name"]: r for r in results}
    attacks = list(preset.eval_attacks)
    first = results[0] if results else {}
    n_test = first.get("evaluation", {}).get("num_examples", preset.test_examples)
    lines = [
        f"# Robustness benchmark: `{preset_name}`",
        "",
        f"- Setup: {preset.description}.",
        f"- Training examples: {first.get('train_examples', '?')} (the first "
        f"{preset.train_examples or 'examples'} of train minus the last "
        f"{preset.validation_examples}, held out for checkpoint selection); evaluated "
        "checkpoint: the run's `best.keras` (best validation PGD accuracy; with 1 epoch, the "
        "final model), trained by `pipeline.run` or, for seed-0 rows of the same recipe, by "
        "`benchmarks/stability.py` (column `trained by`).",
        f"- Evaluation: the first {n_test} test examples, L-inf epsilon {preset.epsilon:g}; "
        f"{', '.join(attacks)}; {preset.restarts} random start(s) of every randomized attack "
        f"(APGD-T: {preset.restarts} per target class, {preset.apgd_targets} target classes); "
        "PGD step 2.5·eps/steps; APGD steps as named (default 100). **Worst case** = correct "
        "under every attack and restart (per example). Accuracies in %.",
        f"- Rows finished: {len(results)}/{len(rows)}; total wall time of the finished rows "
        f"(training + evaluation + overhead): {total_seconds / 60:.1f} min.",
    ]
    if preset.precisions != (BASE_PRECISION,):
        lines.append(
            f"- Training precision: every row in each of {', '.join(preset.precisions)} (Keras "
            "dtype policies; the mixed ones compute in 16 bits and keep float32 weights), named "
            f"after it; every model evaluated in {BASE_PRECISION} (a {BASE_PRECISION} copy of "
            "its weights)."
        )
    if first.get("machine"):
        m = first["machine"]
        lines.append(
            f"- Machine: {m['cpu']}, {m['cpus']} CPUs, GPUs: {m['gpus'] or 'none'}; "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}."
        )
    table = []
    for row in rows:
        r = by_name.get(row.name)
        if r is None:
            table.append([row.label, row.seed, "(pending)"] + [""] * (len(attacks) + 4))
            continue
        table.append(
            [
                row.label,
                r["seed"],
                _pct(r["clean_accuracy"]),
                *(_pct(r["attack_accuracy"].get(a)) for a in attacks),
                f"**{_pct(r['robust_accuracy'])}**",
                f"{r['train_seconds']:.0f}",
                f"{r['eval_seconds']:.0f}",
                os.path.basename(r.get("trained_by", "keras_adr.pipeline.run")),
            ]
        )
    lines += [
        "",
        "## All rows",
        "",
        *results_io.markdown_table(
            ["row", "seed", "clean", *attacks, "worst case", "train s", "eval s", "trained by"],
            table,
            align="lrr" + "r" * len(attacks) + "rrrl",
        ),
    ]
    if seeds:
        fmt = lambda st: (
            "-"
            if st is None
            else f"{100 * st['mean']:.1f} ± "
            f"{100 * st['std']:.1f} [{100 * st['min']:.1f}–{100 * st['max']:.1f}]"
        )
        table = [
            [
                defense,
                ",".join(map(str, s["seeds"])),
                fmt(s["clean_accuracy"]),
                *(fmt(s.get(a)) for a in attacks),
                f"**{fmt(s['robust_accuracy'])}**",
                f"{s['train_seconds']['mean']:.0f}",
            ]
            for defense, s in seeds.items()
        ]
        lines += [
            "",
            "## Headline: mean over seeds",
            "",
            "mean ± sample standard deviation [min–max] over the seeds listed.",
            "",
            *results_io.markdown_table(
                ["defense", "seeds", "clean", *attacks, "worst case", "train s"],
                table,
                align="llr" + "r" * len(attacks) + "rr",
            ),
        ]
    if verdict_:
        yes = lambda ok: "yes" if ok else "**no**"
        incomplete = "" if verdict_["seeds_complete"] else ", seeds incomplete"
        lines += [
            "",
            f"**adr_pgd >= pgd_at** (means over seeds{incomplete}): clean "
            f"{yes(verdict_['adr_pgd_clean_ge_pgd_at'])} "
            f"({100 * verdict_['clean_difference']:+.1f} points), worst-case robust "
            f"{yes(verdict_['adr_pgd_robust_ge_pgd_at'])} "
            f"({100 * verdict_['robust_difference']:+.1f} points). Target (adr_pgd at "
            "least +1.0 point worst case with clean accuracy at most 0.5 points lower): "
            f"{yes(verdict_['meets_target'])}.",
        ]
        paired = verdict_.get("paired")
        if paired:
            lines += [
                "",
                "Paired per-example comparison (same test examples, seed-matched runs, "
                "pooled over seeds; exact two-sided sign test on the discordant examples): "
                + "; ".join(
                    f"{what}: {p['adr_only']} examples correct only with adr_pgd, "
                    f"{p['pgd_at_only']} only with pgd_at, p = {p['p_value']:.2f}"
                    for what, p in paired.items()
                )
                + ".",
            ]
    if pairs:
        lines += _pairs_markdown(pairs)
    if comparison:
        lines += _precision_markdown(comparison, n_test)
    base = by_name.get("adr_pgd")
    ablations = [row for row in rows if row.group == "ablation" and row.name in by_name]
    if base and ablations:
        table = [
            [
                row.label,
                _pct(r["clean_accuracy"]),
                f"{100 * (r['clean_accuracy'] - base['clean_accuracy']):+.1f}",
                _pct(r["robust_accuracy"]),
                f"{100 * (r['robust_accuracy'] - base['robust_accuracy']):+.1f}",
            ]
            for row, r in ((row, by_name[row.name]) for row in ablations)
        ]
        lines += [
            "",
            "## Ablation of adr_pgd (seed 0): change against adr_pgd",
            "",
            *results_io.markdown_table(
                ["row", "clean", "Δ clean", "worst case", "Δ worst case"], table
            ),
        ]
    lines += ["", sanity_line(results)]
    return "\n".join(lines) + "\n"


def _pairs_markdown(pairs):
    """The section of `row_pairs`: one line per pair of finished rows."""
    table = []
    for p in pairs:
        paired = p["paired"] or {}
        tested = [
            f"{what}: {c['row_only']} vs {c['reference_only']}, p = {c['p_value']:.2f}"
            for what, c in paired.items()
        ]
        table.append(
            [
                f"{p['row']} − {p['reference']}",
                f"{100 * p['clean_difference']:+.1f}",
                f"{100 * p['robust_difference']:+.1f}",
                "; ".join(tested) or "-",
            ]
        )
    return [
        "",
        "## Pairs of rows (same test examples)",
        "",
        "Differences in points; discordant examples (correct only with the first row vs "
        "only with the second) and the exact two-sided sign test.",
        "",
        *results_io.markdown_table(
            ["pair", "Δ clean", "Δ worst case", "discordant examples"], table, align="lrrl"
        ),
    ]


def _precision_markdown(comparison, n_test):
    """The section of `precision_comparison`: a table per compared precision."""
    reference = comparison["reference"]
    points = lambda st: "-" if st is None else f"{100 * st['difference']:+.1f}"

    def discordant(paired, what, other):
        if not paired:
            return "-"
        p = paired[what]
        return f"{p[f'{reference}_only']} / {p[f'{other}_only']} (p = {p['p_value']:.2f})"

    lines = []
    for other, by_defense in comparison["comparisons"].items():
        table = []
        for defense, c in by_defense.items():
            for label, e in [(str(e["seed"]), e) for e in c["seeds"]] + [
                (f"**mean** ({', '.join(map(str, c['mean']['seeds']))})", c["mean"])
            ]:
                clean, robust, train = (
                    e[k] for k in ("clean_accuracy", "robust_accuracy", "train_seconds")
                )
                table.append(
                    [
                        defense,
                        label,
                        _pct(clean and clean[reference]),
                        _pct(clean and clean[other]),
                        points(clean),
                        _pct(robust and robust[reference]),
                        _pct(robust and robust[other]),
                        f"**{points(robust)}**",
                        discordant(e["paired"], "clean", other),
                        discordant(e["paired"], "worst case", other),
                        "-" if train is None else f"{train[reference]:.0f} / {train[other]:.0f}",
                    ]
                )
        lines += [
            "",
            f"## Training precision: {other} against {reference}",
            "",
            f"Every model evaluated in {BASE_PRECISION} on the same {n_test} test examples with "
            f"the same attacks. Δ = {other} − {reference}, in points. Discordant: test examples "
            f"correct (clean, or under every attack) with only the {reference} / only the "
            f"{other} model of a pair (pooled over seeds in the mean rows); p: exact two-sided "
            "sign test on them.",
            "",
            *results_io.markdown_table(
                [
                    "defense",
                    "seed",
                    f"clean {reference}",
                    f"clean {other}",
                    "Δ clean",
                    f"worst case {reference}",
                    f"worst case {other}",
                    "Δ worst case",
                    f"clean: only {reference} / only {other}",
                    f"worst case: only {reference} / only {other}",
                    f"train s {reference} / {other}",
                ],
                table,
                align="llrrrrrrrrr",
            ),
        ]
    return lines


def plot(preset_name, rows, results, seeds, path):
    from matplotlib.figure import Figure

    by_name = {r["name"]: r for r in results}
    shown = [row for row in rows if row.name in by_name]
    if not shown:
        return
    figure = Figure(figsize=(8, 0.45 * len(shown) + 1.8), dpi=110)
    axes = figure.add_subplot()
    positions = np.arange(len(shown))[::-1]
    clean = [100 * by_name[row.name]["clean_accuracy"] for row in shown]
    robust = [100 * by_name[row.name]["robust_accuracy"] for row in shown]
    axes.barh(positions + 0.2, clean, height=0.4, color="#9ecae1", label="clean")
    axes.barh(positions - 0.2, robust, height=0.4, color="#08519c", label="worst case")
    for defense, s in seeds.items():
        if defense in by_name:
            y = positions[shown.index(next(r for r in shown if r.name == defense))]
            for offset, key, color in (
                (0.2, "clean_accuracy", "#555555"),
                (-0.2, "robust_accuracy", "black"),
            ):
                st = s[key]
                axes.errorbar(
                    100 * st["mean"],
                    y + offset,
                    color=color,
                    capsize=3,
                    marker="|",
                    xerr=[
                        [max(0.0, 100 * (st["mean"] - st["min"]))],
                        [max(0.0, 100 * (st["max"] - st["mean"]))],
                    ],
                )
    axes.set_yticks(positions, [row.label for row in shown], fontsize="small")
    axes.set_xlabel(
        "accuracy (%)  —  bars: seed 0; whiskers on pgd_at / adr_pgd: mean and min–max over seeds",
        fontsize="small",
    )
    axes.set_xlim(0, 100)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title(f"Robustness benchmark: {preset_name}")
    figure.tight_layout()
    figure.savefig(path)


def write_summary(preset_name, preset, rows, rows_dir, results_dir):
    """Rewrites `<results_dir>/<preset_name>.{json,md,png}` from the rows finished in `rows_dir`.

    A row file counts only with the row's current fingerprint. Returns those rows.
    """
    results = []
    fingerprints = {row.name: fingerprint(preset, row) for row in rows}
    for row in rows:
        r = results_io.read_json(os.path.join(rows_dir, f"{row.name}.json"))
        if r and r.get("fingerprint") == fingerprints[row.name]:
            results.append(r)
    if preset.points:
        return write_frontier_summary(preset_name, preset, rows, results, results_dir)
    seeds = seed_summary(results, preset)
    verdict_ = verdict(seeds, len(preset.seeds), results)
    comparison = precision_comparison(results, preset)
    total = sum(r["row_seconds"] for r in results)
    base = os.path.join(results_dir, preset_name)
    compact = [{k: v for k, v in r.items() if not k.endswith("_bits")} for r in results]
    summary = {
        "preset": preset_name,
        "settings": dataclasses.asdict(preset),
        "rows_expected": [row.name for row in rows],
        "rows": compact,
        "seed_summary": seeds,
        "spread": "sample std (ddof=1) and min-max over seeds",
        "verdict": verdict_,
        "total_row_seconds": round(total, 1),
    }
    pairs = row_pairs(results)
    for suffix, _, overrides in preset.variants:
        matched = variant_pairs(rows, overrides)
        pairs += row_pairs(results, matched)
        pooled = pooled_pair(results, matched, f"adr_pgd_{suffix}", "adr_pgd")
        if pooled:
            pairs.append(pooled)
    if pairs:
        summary["row_pairs"] = pairs
    if comparison:  # Presets of one precision keep their summary as it was.
        summary["precision_comparison"] = comparison
    results_io.write_json_atomic(f"{base}.json", summary)
    results_io.write_text(
        f"{base}.md",
        markdown(preset_name, preset, rows, results, seeds, verdict_, total, comparison, pairs),
    )
    try:
        plot(preset_name, rows, results, seeds, f"{base}.png")
    except Exception:  # noqa: BLE001 - a plotting problem must not stop the benchmark
        logging.exception("could not draw %s.png", base)
    return results
