"""The frontier study's report: `<preset>.md` (verdict, tables) and `<preset>.png` (figure).

What it reports is computed by `robustness_frontier`; `write_frontier_summary`
writes the JSON, the markdown and the figure from the finished rows.
"""

import os

import numpy as np

from benchmarks import results_io
from benchmarks.robustness_frontier import (
    ADR,
    BASELINES,
    FAMILIES,
    KNOBS,
    REFERENCE_PRESET,
    _entries,
    _runs,
    choices,
    curve,
    curve_height,
    ema_pairs,
    pending,
    reference_points,
    verdict,
)
from benchmarks.robustness_presets import DEFAULT_GROUP
from benchmarks.robustness_stats import sanity_line


def adr_curve_lines(entries):
    """Each ADR point of the first seed against every baseline line's height there."""
    first = min(e["seed"] for e in entries)
    adr = _runs(entries, ADR, first)
    if not adr:
        return []
    lines = [
        f"Each ADR point of seed {first} against the highest the baseline lines of the figure "
        "reach at its clean accuracy (outside the verdict; '-' where a line does not reach it):",
        "",
        "| ADR point | clean | worst case | "
        + " | ".join(f"{FAMILIES[f]} there | ADR minus {FAMILIES[f]}" for f in BASELINES)
        + " |",
        "|---|---:|---:|" + "---:|---:|" * len(BASELINES),
    ]
    for e in sorted(adr, key=lambda e: e["overrides"][KNOBS[ADR]]):
        cells = []
        for family in BASELINES:
            height = curve_height(entries, family, first, e["clean_accuracy"])
            cells += (
                [_pct(height), _pct(e["robust_accuracy"] - height, True)]
                if height is not None
                else ["-", "-"]
            )
        lines.append(
            f"| {e['label']} | {_pct(e['clean_accuracy'])} | {_pct(e['robust_accuracy'])} | "
            + " | ".join(cells)
            + " |"
        )
    return lines + [""]


def _pct(value, signed=False):
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown(preset_name, preset, rows, entries, chosen, verdict_, emas, references):
    attacks = list(preset.eval_attacks)
    done = {e["row"] for e in entries}
    lines = [
        f"# Robustness-accuracy frontier: `{preset_name}`",
        "",
        f"- Setup: {preset.description}.",
        f"- Evaluation: all {preset.test_examples or 10000} test images at L-inf epsilon "
        f"{preset.epsilon:g}; {', '.join(attacks)}, each attack only on the images every "
        "earlier one left correct (a column is the accuracy after that attack); **worst case** "
        "= correct under every attack (per example). Models evaluated in float32.",
        "- Choices on the validation split (2,000 images held out of train; each row's "
        "selected epoch is its best validation robust accuracy): the ADR point is the weight "
        "scale of best validation robust accuracy; the baseline points run at more seeds "
        "(`seeded_points`) are chosen around its validation clean accuracy, plus the PGD-AT "
        "points a seed's test curve needs to reach the ADR point's test clean accuracy (never "
        "chosen by worst-case accuracy).",
        f"- Figure `{preset_name}.png`: every point on the left, the dashed box around the ADR "
        "curve enlarged on the right; a point is the mean over the seeds run, its bars the "
        "min-max; hollow points have an EMA of the weights; the star is adr-train's former "
        "default recipe (ADR x1, PGD-5; on no curve; `frontier_defaults.md` compares it on "
        "validation with the frontier's choices, and the defaults moved to the chosen ADR "
        "point); grey squares are reference points.",
        f"- Rows finished: {len(done)}/{len(rows)}. Pending: "
        + (", ".join(row.name for row in rows if row.name not in done) or "none")
        + ".",
        "",
    ]
    if verdict_:
        lines += _verdict_lines(verdict_) + adr_curve_lines(entries)
    table = [
        [
            e["label"],
            e["seed"],
            _pct(e["clean_accuracy"]),
            *(_pct(e["attack_accuracy"].get(a)) for a in attacks),
            f"**{_pct(e['robust_accuracy'])}**",
            _pct(e["val_clean_accuracy"]),
            _pct(e["val_robust_accuracy"]),
            f"{e['train_seconds']:.0f}",
            f"{e['eval_seconds']:.0f}",
        ]
        for e in sorted(entries, key=lambda e: (e["family"], e["ema"], e["clean_accuracy"]))
    ]
    lines += [
        "## All rows (accuracies in %)",
        "",
        *results_io.markdown_table(
            [
                "point",
                "seed",
                "clean",
                *(f"after {a}" for a in attacks),
                "worst case",
                "val clean",
                "val robust",
                "train s",
                "eval s",
            ],
            table,
            align="lrr" + "r" * len(attacks) + "rrrrr",
        ),
    ]
    if chosen:
        brackets = "; ".join(
            f"{f}: {', '.join(p) if p else 'not bracketed yet'}"
            for f, p in chosen["brackets"].items()
        )
        lines += [
            "",
            f"Chosen on validation: ADR point `{chosen['adr_point']}` ({chosen['criterion']}); "
            f"bracketing baseline points: {brackets}.",
        ]
    if emas:
        lines += [
            "",
            "## EMA of the weights (momentum "
            f"{next(r.ema_momentum for r in rows if r.ema_momentum):g}) against none",
            "",
            *results_io.markdown_table(
                ["point", "seed", "Δ clean", "Δ worst case"],
                [
                    [
                        p["point"],
                        p["seed"],
                        _pct(p["clean_difference"], True),
                        _pct(p["robust_difference"], True),
                    ]
                    for p in emas
                ],
            ),
        ]
    if references:
        lines += [
            "",
            "Reference points (grey in the figure), PGD-5 training, from "
            f"`{REFERENCE_PRESET}.md`: "
            + "; ".join(f"{label} {_pct(c)} / {_pct(r)}" for label, c, r in references)
            + " (clean / worst case).",
        ]
    lines += ["", sanity_line([e["result"] for e in entries])]
    return "\n".join(lines) + "\n"


_ANSWERS = {True: "yes", False: "no", None: "not decided yet"}
_HEADLINE_ANSWERS = {
    True: "ADR moves the robustness-accuracy frontier here",
    False: "ADR does not move the robustness-accuracy frontier here",
    None: "Whether ADR moves the robustness-accuracy frontier is not decided yet",
}


def _seed_list(seeds):
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def headline(v):
    """The verdict in two sentences: the README quotes them between its frontier-verdict markers."""
    if not v:
        return None
    seeds = [s["seed"] for s in v["per_seed"]]
    gains = []
    for family in BASELINES:
        measured = [
            (s["seed"], s["families"][family]["gain"])
            for s in v["per_seed"]
            if s["families"].get(family, {}).get("gain") is not None
        ]
        if not measured:
            continue
        family_seeds, values = zip(*measured)
        text = f"{_pct(np.mean(values), True)} points over the {FAMILIES[family]} curve"
        unreachable = v.get("unreachable_seeds", {}).get(family)
        why = (
            [f"at {_seed_list(unreachable)} that curve does not reach ADR's clean accuracy"]
            if unreachable
            else []
        )
        if len(values) > 1:
            per_seed = ", ".join(_pct(g, True) for g in values)
            text += f" ({'; '.join([f'{_seed_list(family_seeds)}: {per_seed}', *why])})"
        elif len(seeds) > 1:
            text += f" ({': '.join([f'{_seed_list(family_seeds)} only', *why])})"
        gains.append(text)
    clean = np.mean([s["adr_clean"] for s in v["per_seed"]])
    robust = np.mean([s["adr_robust"] for s in v["per_seed"]])
    return (
        f"**{_HEADLINE_ANSWERS[v['moves_frontier']]}** (the bar: at least "
        f"+{100 * v['margin']:.0f} point of worst-case accuracy over the best baseline curve at "
        "equal clean accuracy, in every seed). The ADR point chosen on validation has "
        f"{_pct(clean)}% clean and {_pct(robust)}% worst-case accuracy "
        f"({_seed_list(seeds)}{'' if len(seeds) == 1 else ', mean'}), "
        + " and ".join(gains or ["and no baseline curve reaches its clean accuracy yet"])
        + "."
    )


def _verdict_lines(v):
    lines = ["## Verdict", "", f"Headline (quoted by the README): {headline(v)}", ""]
    for s in v["per_seed"]:
        parts = []
        for family, g in s["families"].items():
            if g["gain"] is None:
                done = " (every planned point has run)" if g.get("unreachable") else ""
                over = g.get("over_more_accurate")
                if over:
                    done += (
                        f"; its most robust point with at least ADR's clean accuracy, "
                        f"`{over['point']}`, has {_pct(over['robust'])} "
                        f"(ADR {_pct(over['gain'], True)} points)"
                    )
                parts.append(f"{family}: {g.get('note')}{done}")
            else:
                parts.append(
                    f"{family} {_pct(g['interpolated_robust'])} "
                    f"(ADR {_pct(g['gain'], True)} points)"
                )
        lines.append(
            f"- Seed {s['seed']}: ADR (`{v['adr_point']}`) {_pct(s['adr_clean'])} clean, "
            f"{_pct(s['adr_robust'])} worst case; baselines' worst case at that clean "
            "accuracy: " + "; ".join(parts) + "."
        )
    mean = v["mean_gain_over_best"]
    unbracketed = [f for f, g in v["families_at_first_seed"].items() if g["gain"] is None]
    lines.append(
        (
            f"- ADR minus the best baseline family: {_pct(mean, True)} points on average over "
            f"seeds {v['gain_seeds']}"
            if not unbracketed
            else f"- ADR minus the best baseline family: not known until the {unbracketed[0]} "
            "curve reaches ADR's clean accuracy"
        )
        + ("" if v["seeds_complete"] else " (seeds incomplete)")
        + "".join(
            f"; at {_seed_list(seeds_)} the {FAMILIES[family]} curve does not reach ADR's "
            "clean accuracy, so they have no gain at equal clean accuracy (no extrapolation)"
            for family, seeds_ in v.get("unreachable_seeds", {}).items()
        )
        + f". ADR moves the frontier (at least +{100 * v['margin']:.0f} point over the best "
        f"family in every seed): **{_ANSWERS[v['moves_frontier']]}**."
    )
    t = v.get("nearest_baseline_test")
    if t:
        w, c = t["worst case"], t["clean"]
        lines.append(
            f"- Against the nearest measured baseline point `{t['baseline_point']}` "
            f"({t['seeds']} seed(s), per example, exact sign test): worst case "
            f"{w['adr_only']} vs {w['baseline_only']} examples correct with only one "
            f"(p = {w['p_value']:.3f}); clean {c['adr_only']} vs {c['baseline_only']} "
            f"(p = {c['p_value']:.3f})."
        )
    tests = v.get("seeded_baseline_tests")
    if tests:
        lines += [
            "",
            "Per example against every baseline point run at all of ADR's seeds, pooled over "
            "the seeds (examples correct under ADR only vs under the baseline only; exact sign "
            "test):",
            "",
            "| baseline point | seeds | worst case | p | clean | p |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for t in tests:
            w, c = t["worst case"], t["clean"]
            lines.append(
                f"| `{t['baseline_point']}` | {t['seeds']} | {w['adr_only']} vs "
                f"{w['baseline_only']} | {w['p_value']:.3g} | {c['adr_only']} vs "
                f"{c['baseline_only']} | {c['p_value']:.3g} |"
            )
    return lines + [""]


_COLORS = {"pgd_at": "#1f77b4", "trades": "#2ca02c", "adr_pgd": "#d62728"}


# The zoomed panel: the ADR curve's box, widened by this many points of clean
# accuracy each side and of worst-case accuracy below and above (% points).
_ZOOM_MARGINS = (1.0, 6.0, 1.0)


def _draw(axes, entries, references):
    """The curves, seed bars, EMA points, the former default and references, on `axes`."""
    for family, label in FAMILIES.items():
        for ema in (False, True):
            means = curve(entries, family, ema)
            if not means:
                continue
            xs, ys = [m[0] for m in means], [m[1] for m in means]
            axes.plot(
                xs,
                ys,
                linestyle="-" if not ema else "none",
                marker="o",
                markerfacecolor="none" if ema else _COLORS[family],
                color=_COLORS[family],
                label=label + (" + EMA" if ema else ""),
            )
            for x, y, runs in means:
                if len(runs) > 1:
                    clean = [100 * e["clean_accuracy"] for e in runs]
                    robust = [100 * e["robust_accuracy"] for e in runs]
                    axes.errorbar(
                        x,
                        y,
                        xerr=[[x - min(clean)], [max(clean) - x]],
                        yerr=[[y - min(robust)], [max(robust) - y]],
                        color=_COLORS[family],
                        capsize=3,
                        linewidth=1,
                    )
    defaults = [e for e in entries if e["family"] == DEFAULT_GROUP]
    for index, e in enumerate(defaults):
        axes.plot(
            100 * e["clean_accuracy"],
            100 * e["robust_accuracy"],
            marker="*",
            markersize=11,
            color=_COLORS[ADR],
            linestyle="none",
            label=None if index else "ADR-PGD x1, PGD-5 training (adr-train's former default)",
        )
    for label, clean, robust in references:
        axes.plot(100 * clean, 100 * robust, marker="s", color="grey", linestyle="none")
        axes.annotate(
            label,
            (100 * clean, 100 * robust),
            xytext=(5, 3),  # beside the marker, not under it
            textcoords="offset points",
            fontsize="x-small",
            color="grey",
        )
    axes.set_xlabel("clean accuracy (%)")
    axes.set_ylabel("worst-case robust accuracy (%)")
    axes.grid(alpha=0.3)


def zoom_box(entries):
    """`(x0, x1, y0, y1)` in %: every ADR run, with `_ZOOM_MARGINS` around it, or None."""
    adr = [e for e in entries if e["family"] == ADR]
    if not adr:
        return None
    clean = [100 * e["clean_accuracy"] for e in adr]
    robust = [100 * e["robust_accuracy"] for e in adr]
    side, below, above = _ZOOM_MARGINS
    return min(clean) - side, max(clean) + side, min(robust) - below, max(robust) + above


def plot(preset_name, entries, references, verdict_, path):
    """Two panels: every point, and a zoom on the ADR curve where the verdict is read."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not entries:
        return
    figure = Figure(figsize=(12, 5), dpi=110)
    overview, zoom = figure.subplots(1, 2)
    for axes in (overview, zoom):
        _draw(axes, entries, references)
    box = zoom_box(entries)
    if box:
        x0, x1, y0, y1 = box
        zoom.set_xlim(x0, x1)
        zoom.set_ylim(y0, y1)
        overview.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linestyle="--", color="grey")
        )
    title = f"{preset_name}: higher and to the right is better"
    if verdict_ and verdict_["mean_gain_over_best"] is not None:
        gain = 100 * verdict_["mean_gain_over_best"]
        title += (
            f"\nADR - best baseline at equal clean accuracy: {gain:+.1f} points "
            f"({_seed_list(verdict_['gain_seeds'])})"
        )
    overview.set_title(title, fontsize="medium")
    zoom.set_title("the dashed box, around the ADR curve", fontsize="medium")
    # Under both panels, where it hides no point.
    figure.legend(
        *overview.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small"
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path)


def write_frontier_summary(preset_name, preset, rows, results, results_dir):
    """Rewrites `<results_dir>/<preset_name>.{json,md,png}` of a frontier preset."""
    entries = _entries(rows, results)
    chosen = choices(entries)
    verdict_ = verdict(entries, chosen, pending(rows, entries))
    emas = ema_pairs(entries)
    references = reference_points(results_dir)
    base = os.path.join(results_dir, preset_name)
    summary = {
        "preset": preset_name,
        "rows_expected": [row.name for row in rows],
        "rows": [
            {k: v for k, v in e.items() if k != "result"}
            | {"overrides": e["overrides"], "ema_momentum": e["result"].get("ema_momentum")}
            for e in entries
        ],
        "choices_on_validation": chosen,
        "verdict": verdict_,
        "ema_pairs": emas,
        "reference_points": [
            {"label": label, "clean_accuracy": c, "robust_accuracy": r}
            for label, c, r in references
        ],
    }
    results_io.write_json_atomic(f"{base}.json", summary)
    results_io.write_text(
        f"{base}.md",
        markdown(preset_name, preset, rows, entries, chosen, verdict_, emas, references),
    )
    plot(preset_name, entries, references, verdict_, f"{base}.png")
    return results
