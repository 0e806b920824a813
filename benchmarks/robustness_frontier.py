"""The frontier study's summary: does ADR sit above the baselines' robustness-accuracy curves?

A frontier preset (`Preset.points`) trains each family as a curve: PGD-AT
over its training epsilon, TRADES over beta, ADR-PGD over a scale of its
weights, some points also with an EMA of the weights. This module turns the
finished rows into `<preset>.{json,md,png}`:

- the choices, made on the validation split (each row's selected epoch:
  its best validation robust accuracy): the ADR point (the scale of best
  validation robust accuracy, without EMA), and the two points of each
  baseline family whose validation clean accuracy brackets it (the points
  to run at more seeds);
- the verdict, on the test set: each baseline family's worst-case accuracy
  interpolated linearly at the ADR point's clean accuracy (between the two
  measured points around it; no extrapolation), ADR minus the best family
  per seed (each seed's ADR run against the same seed's bracketing runs)
  and on average, and an exact sign test against the nearest measured
  baseline point, pooled over seeds. "ADR moves the frontier" means at
  least +1 point at equal clean accuracy over the best family in every seed.
  Where a seed's curve does not reach ADR's clean accuracy, ADR is compared,
  outside the bar, with that seed's most robust point that is as accurate;
- the EMA pairs (the same point with and without EMA);
- the figure: clean (x) against worst-case (y) accuracy, a curve per
  family, seed min-max bars, EMA points hollow, adr-train's former default
  recipe (a point on no curve), and reference points; every point on the
  left, a zoom around the ADR curve on the right.
"""

import os

import numpy as np

from benchmarks import results_io
from benchmarks.robustness_presets import DEFAULT_GROUP
from benchmarks.robustness_stats import _sign_tested, _summed_discordant, sanity_line

# The points a family's curve is drawn through: defense -> family label.
FAMILIES = {"pgd_at": "PGD-AT", "trades": "TRADES", "adr_pgd": "ADR-PGD"}
BASELINES = ("pgd_at", "trades")
ADR = "adr_pgd"
# The override each family's curve runs over (ADR's scale multiplies every weight alike).
KNOBS = {"pgd_at": "attack_epsilon", "trades": "trades_beta", ADR: "local_compactness"}
# "ADR moves the frontier": at least this gain at equal clean accuracy, every seed.
FRONTIER_MARGIN = 0.01
# Reference points from an earlier benchmark of the same setup (PGD-5 training).
REFERENCE_PRESET = "fmnist"


def _display_label(row):
    """The row's label, naming the default point for what it is now: the former default.

    Labels are part of a row's fingerprint, so the point keeps the label it ran with.
    """
    if row.group == DEFAULT_GROUP:
        return row.label.replace("(adr-train's default)", "(adr-train's former default)")
    return row.label


def selected_validation(result):
    """`(val clean, val robust)` accuracy of the row's selected epoch (its best val robust)."""
    history = result.get("history", {})
    robust = [v if v is not None else -1.0 for v in history.get("val_adv_accuracy", [])]
    if not robust:
        return None, None
    best = int(np.argmax(robust))
    return history["val_accuracy"][best], robust[best]


def _entries(rows, results):
    """One dict per finished row: its point, family, seed, EMA and accuracies."""
    by_name = {r["name"]: r for r in results}
    entries = []
    for row in rows:
        r = by_name.get(row.name)
        if r is None:
            continue
        val_clean, val_robust = selected_validation(r)
        entries.append(
            {
                "row": row.name,
                "point": row.name.replace(f"_seed{row.seed}", ""),
                "label": _display_label(row),
                # adr-train's default point is on no family's curve.
                "family": row.defense if row.group != DEFAULT_GROUP else DEFAULT_GROUP,
                "seed": row.seed,
                "ema": bool(row.ema_momentum),
                "overrides": dict(row.overrides),
                "clean_accuracy": r["clean_accuracy"],
                "robust_accuracy": r["robust_accuracy"],
                "attack_accuracy": r["attack_accuracy"],
                "val_clean_accuracy": val_clean,
                "val_robust_accuracy": val_robust,
                "train_seconds": r["train_seconds"],
                "eval_seconds": r["eval_seconds"],
                "result": r,
            }
        )
    return entries


def bracket(points, x, key_x="clean_accuracy"):
    """The two points whose `key_x` are nearest below and above `x`, or None."""
    below = [e for e in points if e[key_x] <= x]
    above = [e for e in points if e[key_x] >= x]
    if not below or not above:
        return None
    low = max(below, key=lambda e: e[key_x])
    high = min(above, key=lambda e: e[key_x])
    return low, high


def interpolate(low, high, x, key_x="clean_accuracy", key_y="robust_accuracy"):
    """`key_y` on the segment from `low` to `high` at `key_x = x`."""
    if high[key_x] == low[key_x]:
        return (low[key_y] + high[key_y]) / 2
    t = (x - low[key_x]) / (high[key_x] - low[key_x])
    return low[key_y] + t * (high[key_y] - low[key_y])


def choices(entries):
    """What the validation split chooses: the ADR point and each family's bracketing points."""
    first = min((e["seed"] for e in entries), default=0)
    adr = [e for e in entries if e["family"] == ADR and not e["ema"] and e["seed"] == first]
    adr = [e for e in adr if e["val_robust_accuracy"] is not None]
    if not adr:
        return None
    # On a tie in robust accuracy, the point with more clean accuracy dominates.
    chosen = max(adr, key=lambda e: (e["val_robust_accuracy"], e["val_clean_accuracy"]))
    out = {"adr_point": chosen["point"], "criterion": "best validation robust accuracy"}
    brackets = {}
    for family in BASELINES:
        points = [
            e for e in entries if e["family"] == family and not e["ema"] and e["seed"] == first
        ]
        pair = bracket(points, chosen["val_clean_accuracy"], "val_clean_accuracy")
        brackets[family] = [p["point"] for p in pair] if pair else None
    out["brackets"] = brackets
    return out


def pending(rows, entries):
    """`(family, seed)` of every expected row that has not finished."""
    finished = {e["row"] for e in entries}
    return {
        (row.defense if row.group != DEFAULT_GROUP else DEFAULT_GROUP, row.seed)
        for row in rows
        if row.name not in finished
    }


def curve_height(entries, family, seed, x):
    """The highest worst-case accuracy the family's line (its points of `seed`, in
    the knob's order, as drawn) reaches at clean accuracy `x`, or None.

    A line that turns back (PGD-AT's largest epsilon gains clean accuracy and
    loses robustness) crosses `x` more than once; the highest crossing is the
    strongest reading of the baseline.
    """
    points = [e for e in entries if e["family"] == family and not e["ema"] and e["seed"] == seed]
    points.sort(key=lambda e: e["overrides"][KNOBS[family]])
    heights = [
        interpolate(*sorted((a, b), key=lambda e: e["clean_accuracy"]), x)
        for a, b in zip(points, points[1:])
        if min(a["clean_accuracy"], b["clean_accuracy"])
        <= x
        <= max(a["clean_accuracy"], b["clean_accuracy"])
    ]
    return max(heights, default=None)


def adr_curve_lines(entries):
    """Each ADR point of the first seed against every baseline line's height there."""
    first = min(e["seed"] for e in entries)
    adr = [e for e in entries if e["family"] == ADR and not e["ema"] and e["seed"] == first]
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


def _over_more_accurate(adr, points):
    """ADR against the family's most robust point with at least its clean accuracy, or None.

    No interpolation and no bar: a point as accurate and as robust as ADR
    dominates it, whichever seed's curve reaches ADR's clean accuracy.
    """
    accurate = [p for p in points if p["clean_accuracy"] >= adr["clean_accuracy"]]
    if not accurate:
        return None
    best = max(accurate, key=lambda p: p["robust_accuracy"])
    return {
        "point": best["point"],
        "robust": best["robust_accuracy"],
        "gain": adr["robust_accuracy"] - best["robust_accuracy"],
    }


def verdict(entries, chosen, pending_=frozenset()):
    """The test-set comparison of the chosen ADR point with each baseline family.

    `pending_` holds the `(family, seed)` of rows still to run: a family that
    does not reach ADR's clean accuracy at a seed is "to run" while it has
    some, and "unreachable" (no gain at equal clean accuracy) once it has none.
    """
    if not chosen:
        return None
    seeds = sorted({e["seed"] for e in entries if e["point"] == chosen["adr_point"]})
    first = min(e["seed"] for e in entries)
    per_seed, families = [], {}
    for seed in seeds:
        adr = next(e for e in entries if e["point"] == chosen["adr_point"] and e["seed"] == seed)
        gains = {}
        for family in BASELINES:
            points = [
                e for e in entries if e["family"] == family and not e["ema"] and e["seed"] == seed
            ]
            pair = bracket(points, adr["clean_accuracy"])
            if pair:
                baseline = interpolate(*pair, adr["clean_accuracy"])
                gains[family] = {
                    "interpolated_robust": baseline,
                    "gain": adr["robust_accuracy"] - baseline,
                    "between": [p["point"] for p in pair],
                }
            else:
                side = (
                    "below every"
                    if all(p["clean_accuracy"] > adr["clean_accuracy"] for p in points)
                    else "above every"
                )
                gains[family] = {
                    "interpolated_robust": None,
                    "gain": None,
                    "note": f"ADR's clean accuracy is {side} measured point"
                    if points
                    else "no points",
                    "unreachable": bool(points) and (family, seed) not in pending_,
                }
            gains[family]["over_more_accurate"] = _over_more_accurate(adr, points)
        measured = {f: g for f, g in gains.items() if g["gain"] is not None}
        if seed == first and len(measured) < len(gains):
            # A family whose curve does not reach ADR's clean accuracy could be
            # the best one: no "best family" until every curve brackets ADR.
            measured = {}
        best = min(measured, key=lambda f: measured[f]["gain"]) if measured else None
        per_seed.append(
            {
                "seed": seed,
                "adr_clean": adr["clean_accuracy"],
                "adr_robust": adr["robust_accuracy"],
                "families": gains,
                "best_family": best,
                "gain_over_best": measured[best]["gain"] if best else None,
            }
        )
        if seed == first:
            families = gains
    gains = [s["gain_over_best"] for s in per_seed]
    nearest = _nearest_test(entries, chosen["adr_point"])
    # Every family bracketed at the first seed (the curves); at the others,
    # the runs of the bracketing points that were seeded.
    # No as soon as one seed gains less than the margin; undecided (None)
    # while a seed has no gain (at the first, a curve that does not reach
    # ADR's clean accuracy leaves it without one).
    if any(g is not None and g < FRONTIER_MARGIN for g in gains):
        moves = False
    elif None in gains:
        moves = None
    else:
        moves = True
    gain_seeds = [s["seed"] for s in per_seed if s["gain_over_best"] is not None]
    # The seeds where a family's every planned point ran and none brackets ADR.
    unreachable = {
        family: [s["seed"] for s in per_seed if s["families"][family].get("unreachable")]
        for family in BASELINES
    }
    gains = [g for g in gains if g is not None]
    return {
        "adr_point": chosen["adr_point"],
        "seeds": seeds,
        "per_seed": per_seed,
        "families_at_first_seed": families,
        "mean_gain_over_best": float(np.mean(gains)) if gains else None,
        # The seeds whose gain is measured (the mean is over these).
        "gain_seeds": gain_seeds,
        "margin": FRONTIER_MARGIN,
        "moves_frontier": moves,
        "unreachable_seeds": {f: seeds_ for f, seeds_ in unreachable.items() if seeds_},
        # Three seeds, and none waiting for rows that could still give it a gain.
        "seeds_complete": len(seeds) >= 3 and not any(s > first for _, s in pending_),
        "nearest_baseline_test": nearest,
        "seeded_baseline_tests": seeded_tests(entries, chosen["adr_point"]),
    }


def _pooled_test(entries, adr, baseline_point):
    """Sign test of the ADR runs `{seed: entry}` against a baseline point, pooled
    over the seeds both ran, or None without per-example bits."""
    pairs = [
        (adr[e["seed"]]["result"], e["result"])
        for e in entries
        if e["point"] == baseline_point and e["seed"] in adr
    ]
    counts = _summed_discordant(pairs)
    if counts is None:
        return None
    tested = _sign_tested(counts, "adr", "baseline")
    return {"baseline_point": baseline_point, "seeds": len(pairs), **tested}


def _nearest_test(entries, adr_point):
    """Sign test of the ADR point against the baseline point nearest in clean accuracy."""
    adr = {e["seed"]: e for e in entries if e["point"] == adr_point}
    first = min(adr)
    candidates = [
        e for e in entries if e["family"] in BASELINES and not e["ema"] and e["seed"] == first
    ]
    if not candidates:
        return None
    nearest = min(candidates, key=lambda e: abs(e["clean_accuracy"] - adr[first]["clean_accuracy"]))
    return _pooled_test(entries, adr, nearest["point"])


def seeded_tests(entries, adr_point):
    """Sign tests of the ADR point against every baseline point run at all of its seeds."""
    adr = {e["seed"]: e for e in entries if e["point"] == adr_point}
    if len(adr) < 2:
        return []
    seeds = {}
    for e in entries:
        if e["family"] in BASELINES and not e["ema"] and e["seed"] in adr:
            seeds.setdefault(e["point"], set()).add(e["seed"])
    tests = [_pooled_test(entries, adr, p) for p, s in seeds.items() if s == set(adr)]
    return [t for t in tests if t]


def ema_pairs(entries):
    """Each EMA point against the same point without EMA, per seed."""
    by_key = {(e["point"], e["seed"]): e for e in entries}
    out = []
    for e in entries:
        if not e["ema"]:
            continue
        plain = by_key.get((e["point"].replace("_ema", ""), e["seed"]))
        if plain:
            out.append(
                {
                    "point": e["point"],
                    "seed": e["seed"],
                    "clean_difference": e["clean_accuracy"] - plain["clean_accuracy"],
                    "robust_difference": e["robust_accuracy"] - plain["robust_accuracy"],
                }
            )
    return out


def reference_points(results_dir):
    """`[(label, clean, robust)]` of the earlier PGD-5 benchmark's seed means / rows."""
    summary = results_io.read_json(os.path.join(results_dir, f"{REFERENCE_PRESET}.json"))
    if not summary:
        return []
    points = [
        (f"{d} (PGD-5, 3 seeds)", s["clean_accuracy"]["mean"], s["robust_accuracy"]["mean"])
        for d, s in summary.get("seed_summary", {}).items()
    ]
    points += [
        (f"{r['name']} (PGD-5, seed 0)", r["clean_accuracy"], r["robust_accuracy"])
        for r in summary.get("rows", [])
        if r["name"] in ("trades", "adr_trades")
    ]
    return points


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
            f": at {_seed_list(unreachable)} that curve does not reach ADR's clean accuracy"
            if unreachable
            else ""
        )
        if len(values) > 1:
            per_seed = ", ".join(_pct(g, True) for g in values)
            text += f" ({_seed_list(family_seeds)}: {per_seed}{why.replace(':', ';', 1)})"
        elif len(seeds) > 1:
            text += f" ({_seed_list(family_seeds)} only{why})"
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


def curve(entries, family, ema):
    """`[(clean %, worst case %, runs)]` of a family's points, seed means, in the knob's order.

    The line follows the family's own knob (PGD-AT's epsilon, TRADES' beta,
    ADR's weight scale), not clean accuracy, which is noisy across seeds.
    """
    points = {}
    for e in entries:
        if e["family"] == family and e["ema"] == ema:
            points.setdefault(e["point"], []).append(e)
    means = [
        (
            100 * np.mean([e["clean_accuracy"] for e in runs]),
            100 * np.mean([e["robust_accuracy"] for e in runs]),
            runs,
        )
        for runs in points.values()
    ]
    return sorted(means, key=lambda m: m[2][0]["overrides"][KNOBS[family]])


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
