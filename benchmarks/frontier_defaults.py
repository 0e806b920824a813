"""Which of adr-train's defaults the frontier supports, decided on the validation split.

adr-train's default recipe (ADR weights x1, PGD-5 training, no EMA: the
frontier's point on no curve) against what the frontier changed, one thing
at a time: the PGD-10 training attack (ADR x1), the weight scale chosen on
validation, and an EMA of the weights (ADR x1 with EMA). The rows selected
their checkpoints with their own training attack at the test epsilon (PGD-5
for the default, PGD-10 for the others), so those numbers are not compared:
every selected checkpoint (`best.keras`) is evaluated again on the same
2,000 validation images (the last of the training split) with the
frontier's worst-case suite. The candidate of best validation worst case
becomes the default if it beats today's; the test set plays no part.

Writes `<results_dir>/frontier_defaults.{json,md}`, and one file per
evaluated model in `frontier_defaults_rows/` (a rerun skips those whose
row is unchanged).

Usage (after `robustness.py --preset=frontier` has finished these rows):
    python -m benchmarks.frontier_defaults --workdir=runs/benchmarks/frontier
"""

import os
import time

from absl import app, flags, logging

from benchmarks import results_io
from benchmarks.robustness_frontier import ADR
from benchmarks.robustness_presets import (
    ABLATED_TERMS,
    DEFAULT_GROUP,
    PRESETS,
    eval_options,
    rows_of,
)
from benchmarks.robustness_stats import _discordant, _sign_tested, bits

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "frontier"
TODAY = "today's default"
# The overrides of the frontier's ADR point at weight scale 1.
_WEIGHTS_X1 = tuple((term, 1.0) for term in ABLATED_TERMS)

FLAGS = flags.FLAGS


def _define_flags():
    """The command line (defined when run, so that tests can import the module)."""
    flags.DEFINE_string("results_dir", os.path.join(_REPO, "benchmarks", "results"), "Results.")
    flags.DEFINE_string(
        "workdir",
        os.path.join(_REPO, "runs", "benchmarks", PRESET),
        "The frontier's run directories (<workdir>/<row>/best.keras).",
    )
    flags.DEFINE_string("data_dir", None, "Dataset directory (see keras_adr.data.load).")
    flags.DEFINE_integer("threads", 1, "TensorFlow intra-op threads (0: TensorFlow's default).")
    flags.DEFINE_bool("report_only", False, "Rewrite the summary from the evaluated models only.")


def candidates(rows, chosen_point):
    """`[(row, what it changes)]` at the first seed: the default first, then one change each."""
    first = PRESETS[PRESET].seeds[0]
    rows = [r for r in rows if r.seed == first]
    default = next(r for r in rows if r.group == DEFAULT_GROUP)
    adr = [r for r in rows if r.group == "main" and r.defense == ADR]
    x1 = next(r for r in adr if r.overrides == _WEIGHTS_X1 and not r.ema_momentum)
    out = [(default, TODAY), (x1, "PGD-10 training attack")]
    if chosen_point and chosen_point != x1.name:
        chosen = next(r for r in adr if r.name == chosen_point)
        out.append((chosen, "PGD-10, the weight scale chosen on validation"))
    out += [
        (r, "PGD-10, EMA of the weights")
        for r in adr
        if r.overrides == _WEIGHTS_X1 and r.ema_momentum
    ]
    return out


def evaluate(checkpoint, preset, data_dir=None):
    """The worst-case evaluation of `checkpoint` on `preset`'s validation split, as a dict."""
    from keras_adr import data, evaluation

    num_train = data.info(preset.dataset).num_train
    split = f"train[{num_train - preset.validation_examples}:{num_train}]"
    validation = data.load(preset.dataset, split, batch_size=256, data_dir=data_dir)
    started = time.time()
    result = evaluation.evaluate_robustness(checkpoint, validation, **eval_options(preset))
    return {
        "split": split,
        "clean_accuracy": result.clean_accuracy,
        "robust_accuracy": result.robust_accuracy,
        "attack_accuracy": result.attack_accuracy,
        "clean_correct_bits": bits(result.clean_correct),
        "robust_correct_bits": bits(result.robust_correct),
        "evaluation": {"num_examples": result.num_examples},
        "eval_seconds": round(time.time() - started, 1),
        "machine": results_io.machine_info(),
    }


def decide(evaluated):
    """The decision from `[(row, change, evaluation)]`, today's default first.

    Each candidate against the default on the same validation images: the
    differences and exact sign tests of the per-example outcomes. The
    candidate of best validation worst case replaces the default if it is
    higher than the default's.
    """
    (default, _, base), *others = evaluated
    comparisons = [
        {
            "row": row.name,
            "change": change,
            "clean_accuracy": v["clean_accuracy"],
            "robust_accuracy": v["robust_accuracy"],
            "clean_difference": v["clean_accuracy"] - base["clean_accuracy"],
            "robust_difference": v["robust_accuracy"] - base["robust_accuracy"],
            "sign_test": _sign_tested(_discordant(v, base), "candidate", "default"),
        }
        for row, change, v in others
    ]
    best = max(comparisons, key=lambda c: c["robust_accuracy"], default=None)
    return {
        "default": default.name,
        "default_clean_accuracy": base["clean_accuracy"],
        "default_robust_accuracy": base["robust_accuracy"],
        "best": best["row"] if best else None,
        "change": bool(best) and best["robust_difference"] > 0,
        "comparisons": comparisons,
    }


def _pct(value, signed=False):
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def markdown(preset, decision, evaluated, train_seconds):
    """The summary: the models on validation, each change against the default, the decision."""
    attacks = ", ".join(preset.eval_attacks)
    lines = [
        "# adr-train's defaults, decided on the validation split",
        "",
        f"- Models: the selected checkpoints of the `{PRESET}` study's rows (seed 0): "
        "adr-train's default recipe and one change at a time.",
        f"- Evaluation: the {preset.validation_examples:,} validation images (the last of "
        f"the training split, every row's checkpoint was selected on them), L-inf epsilon "
        f"{preset.epsilon:g}, worst case per example over {attacks} (each attack on the "
        "images every earlier one left correct), in float32. The test set plays no part.",
        "- Rule: the candidate of best validation worst case becomes the default if it is "
        "above today's default. Sign test: exact, two-sided, on the examples only one of the "
        "two models gets right.",
        "",
    ]
    rows = [
        [
            f"`{row.name}`",
            change,
            _pct(v["clean_accuracy"]),
            f"**{_pct(v['robust_accuracy'])}**",
            "-",
            "-",
            f"{train_seconds.get(row.name, 0):.0f}",
        ]
        for row, change, v in evaluated[:1]
    ]
    for (row, _, _), c in zip(evaluated[1:], decision["comparisons"]):
        w = c["sign_test"]["worst case"]
        rows.append(
            [
                f"`{row.name}`",
                c["change"],
                _pct(c["clean_accuracy"]),
                f"**{_pct(c['robust_accuracy'])}**",
                _pct(c["robust_difference"], True),
                f"{w['candidate_only']} vs {w['default_only']} (p = {w['p_value']:.3f})",
                f"{train_seconds.get(row.name, 0):.0f}",
            ]
        )
    lines += results_io.markdown_table(
        [
            "row",
            "change",
            "val clean %",
            "val worst case %",
            "Δ worst case",
            "only one right (candidate vs default)",
            "train s",
        ],
        rows,
        align="llrrrrr",
    )
    best = decision["best"]
    lines += [
        "",
        (
            f"Decision: **change** adr-train's defaults to `{best}`'s recipe "
            "(best validation worst case, above today's default)."
            if decision["change"]
            else "Decision: **keep** adr-train's defaults (no candidate is above them on "
            "validation)."
        )
        + (
            f" Provisional: {', '.join(decision['not_evaluated'])} not evaluated yet."
            if decision.get("not_evaluated")
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    results_io.set_threads(FLAGS.threads)
    preset = PRESETS[PRESET]
    rows = rows_of(preset)
    summary = results_io.read_json(os.path.join(FLAGS.results_dir, f"{PRESET}.json")) or {}
    chosen = (summary.get("choices_on_validation") or {}).get("adr_point")
    rows_dir = os.path.join(FLAGS.results_dir, f"{PRESET}_rows")
    out_dir = os.path.join(FLAGS.results_dir, "frontier_defaults_rows")
    os.makedirs(out_dir, exist_ok=True)
    evaluated, train_seconds, missing = [], {}, []
    for row, change in candidates(rows, chosen):
        row_result = results_io.read_json(os.path.join(rows_dir, f"{row.name}.json"))
        if not row_result:
            logging.info("%s: not finished in %s; left out", row.name, rows_dir)
            missing.append(row.name)
            continue
        train_seconds[row.name] = row_result.get("train_seconds") or 0.0
        path = os.path.join(out_dir, f"{row.name}.json")
        done = results_io.read_json(path)
        if not done or done.get("row_fingerprint") != row_result["fingerprint"]:
            if FLAGS.report_only:
                logging.info("%s: not evaluated on validation yet; left out", row.name)
                missing.append(row.name)
                continue
            checkpoint = os.path.join(FLAGS.workdir, row.name, "best.keras")
            if not os.path.exists(checkpoint):
                raise app.UsageError(f"{row.name}: no {checkpoint}; pass --workdir.")
            logging.info("%s: evaluating %s on the validation split", row.name, checkpoint)
            done = {
                "row": row.name,
                "row_fingerprint": row_result["fingerprint"],
                **evaluate(checkpoint, preset, FLAGS.data_dir),
            }
            results_io.write_json_atomic(path, done)
        evaluated.append((row, change, done))
    if not evaluated or evaluated[0][1] != TODAY:
        raise SystemExit(
            "adr-train's default point has no finished row or validation evaluation yet: "
            f"run robustness.py --preset={PRESET} --rows=adr_pgd_x1_pgd5_mixed_bfloat16 first."
        )
    decision = {**decide(evaluated), "not_evaluated": missing}
    base = os.path.join(FLAGS.results_dir, "frontier_defaults")
    results_io.write_json_atomic(
        f"{base}.json",
        {
            "preset": PRESET,
            "adr_point_chosen_on_validation": chosen,
            "models": [{"row": r.name, "change": c, **v} for r, c, v in evaluated],
            "decision": decision,
        },
    )
    results_io.write_text(f"{base}.md", markdown(preset, decision, evaluated, train_seconds))
    logging.info("decision: %s; summary in %s.{json,md}", decision, base)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
