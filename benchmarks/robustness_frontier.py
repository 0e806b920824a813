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

This module computes; `robustness_frontier_report` writes the files.
"""

import os

import numpy as np

from benchmarks import results_io
from benchmarks.robustness_presets import DEFAULT_GROUP
from benchmarks.robustness_stats import _sign_tested, _summed_discordant

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


def _family(row):
    """The row's family: its defense, or adr-train's default point, which is on no curve."""
    return row.defense if row.group != DEFAULT_GROUP else DEFAULT_GROUP


def _runs(entries, family, seed):
    """The family's runs at `seed`, without EMA: the points its curve is read from."""
    return [e for e in entries if e["family"] == family and not e["ema"] and e["seed"] == seed]


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
                "family": _family(row),
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
    adr = [e for e in _runs(entries, ADR, first) if e["val_robust_accuracy"] is not None]
    if not adr:
        return None
    # On a tie in robust accuracy, the point with more clean accuracy dominates.
    chosen = max(adr, key=lambda e: (e["val_robust_accuracy"], e["val_clean_accuracy"]))
    out = {"adr_point": chosen["point"], "criterion": "best validation robust accuracy"}
    brackets = {}
    for family in BASELINES:
        pair = bracket(
            _runs(entries, family, first), chosen["val_clean_accuracy"], "val_clean_accuracy"
        )
        brackets[family] = [p["point"] for p in pair] if pair else None
    out["brackets"] = brackets
    return out


def pending(rows, entries):
    """`(family, seed)` of every expected row that has not finished."""
    finished = {e["row"] for e in entries}
    return {(_family(row), row.seed) for row in rows if row.name not in finished}


def curve_height(entries, family, seed, x):
    """The highest worst-case accuracy the family's line (its points of `seed`, in
    the knob's order, as drawn) reaches at clean accuracy `x`, or None.

    A line that turns back (PGD-AT's largest epsilon gains clean accuracy and
    loses robustness) crosses `x` more than once; the highest crossing is the
    strongest reading of the baseline.
    """
    points = sorted(_runs(entries, family, seed), key=lambda e: e["overrides"][KNOBS[family]])
    heights = [
        interpolate(*sorted((a, b), key=lambda e: e["clean_accuracy"]), x)
        for a, b in zip(points, points[1:])
        if min(a["clean_accuracy"], b["clean_accuracy"])
        <= x
        <= max(a["clean_accuracy"], b["clean_accuracy"])
    ]
    return max(heights, default=None)


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
            points = _runs(entries, family, seed)
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
    candidates = [e for family in BASELINES for e in _runs(entries, family, first)]
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
