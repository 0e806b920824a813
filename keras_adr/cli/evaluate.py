"""Evaluates the adversarial robustness of a trained or exported model.

Runs a suite of attacks (FGSM, PGD-20, PGD-100, APGD-CE, APGD-T by default)
and reports the worst-case robust accuracy per example, an epsilon sweep and
the gradient-masking sanity checks; --suite=autoattack runs AutoAttack's
standard version with AutoAttack's checks instead. The flags build one
`keras_adr.specs.EvalConfig` (their defaults are its defaults). Exits with a
non-zero status if a sanity check fails, unless --allow_sanity_failures.

Example:

```
adr-evaluate --model_path=saved_models/fashion_mnist --num_examples=1000 \
    --epsilon=0.1 --epsilons=0.05,0.1,0.2 --output_dir=runs/eval
```
"""

import sys

from absl import app, flags, logging

from keras_adr import cli, specs
from keras_adr import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "model_path",
    None,
    "A .keras file, a SavedModel directory, or a TF Serving base directory "
    "(its highest integer version is evaluated).",
)
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name (see keras_adr.data.DATASETS).")
flags.DEFINE_string("data_dir", None, "Directory of the dataset files or a TFDS data_dir.")
flags.DEFINE_string("split", "test", "Split to evaluate, e.g. 'test' or 'test[:1000]'.")
# The defaults of the evaluation's flags are EvalConfig's; main builds one EvalConfig from them.
_DEFAULTS = specs.EvalConfig

flags.DEFINE_integer(
    "num_examples", _DEFAULTS.num_examples, "Evaluate only the first N examples of the split."
)
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Examples per attack call.")
flags.DEFINE_float(
    "epsilon", _DEFAULTS.epsilon, "Radius of the threat model (the headline number)."
)
flags.DEFINE_enum("norm", _DEFAULTS.norm, config_lib.NORMS, "Norm of the threat model.")
flags.DEFINE_list(
    "attacks",
    list(_DEFAULTS.attacks),
    "Attacks: fgsm, pgd<steps>, apgd_ce, apgd_dlr, apgd_dlr_t (optionally "
    "with steps, e.g. apgd_ce50). Must include a PGD and an APGD attack.",
)
flags.DEFINE_integer("restarts", _DEFAULTS.restarts, "Random restarts per randomized attack.")
flags.DEFINE_integer(
    "apgd_targets", _DEFAULTS.apgd_targets, "Target classes of apgd_dlr_t (AutoAttack: 9)."
)
flags.DEFINE_list("epsilons", [], "Extra epsilons of the sweep, e.g. 0.05,0.2.")
flags.DEFINE_bool(
    "sanity_sweep",
    True,
    "Also evaluate epsilon 0 and a large epsilon (0.5 for linf), which the gradient-masking "
    "sanity checks need. Costs about one more evaluation.",
)
flags.DEFINE_string(
    "output_dir", None, "Where to write results.json, results.md and the plot; none if unset."
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the random starts.")
flags.DEFINE_bool(
    "allow_sanity_failures",
    False,
    "Exit with status 0 even if a sanity check fails (either suite's checks).",
)
flags.DEFINE_enum(
    "suite",
    "default",
    ["default", "autoattack"],
    "default: --attacks with the sweep and sanity checks; autoattack: AutoAttack's standard "
    "version (APGD-CE, APGD-T, FAB-T, Square) at --epsilon with AutoAttack's checks (zero "
    "input gradients, Square succeeding after the white-box attacks), writing autoattack.json "
    "(RobustBench format) to --output_dir.",
)
flags.DEFINE_enum(
    "precision",
    _DEFAULTS.precision,
    # keras_adr.precision.POLICIES, spelled out: --help must not wait for TensorFlow.
    ["float32", "mixed_bfloat16", "mixed_float16"],
    "Precision in which a .keras model computes during the evaluation, whatever it was "
    "trained in (a SavedModel computes in the precision it was exported with: float32 "
    "for adr-train's exports).",
)
flags.DEFINE_bool(
    "standalone_attacks",
    _DEFAULTS.standalone_attacks,
    "Run every attack on every example and report each attack's own accuracy (for "
    "comparing attacks; enables the step-comparison sanity checks). Default: each attack "
    "only on the examples every earlier one left correct, reporting the accuracy after it "
    "(the same worst case, less work).",
)
flags.mark_flag_as_required("model_path")


def _config():
    """The EvalConfig of the flags."""
    return specs.EvalConfig(
        epsilon=FLAGS.epsilon,
        norm=FLAGS.norm,
        attacks=FLAGS.attacks,
        restarts=FLAGS.restarts,
        num_examples=FLAGS.num_examples,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        apgd_targets=FLAGS.apgd_targets,
        precision=FLAGS.precision,
        standalone_attacks=FLAGS.standalone_attacks,
    )


def _run_autoattack(evaluation, model, dataset, config):
    """AutoAttack's standard version; returns its result and its sanity checks."""
    result = evaluation.autoattack(
        model,
        dataset,
        epsilon=config.epsilon,
        norm=config.norm,
        num_examples=config.num_examples,
        seed=config.seed,
        batch_size=config.batch_size,
        clip_min=config.clip_min,
        clip_max=config.clip_max,
    )
    checks = evaluation.sanity_checks(result)
    print(evaluation.format_summary(result, checks))
    if FLAGS.output_dir:
        path = evaluation.write_autoattack_result(
            result,
            FLAGS.output_dir,
            checks=checks,
            metadata=_provenance(model, config),
            name=FLAGS.model_path,
            defense=_defense_of(model),
            dataset=FLAGS.dataset,
        )
        logging.info("Wrote %s", path)
    return checks


def _provenance(model, config):
    """What a result set came from, recorded beside its completion marker."""
    import datetime
    import os
    import shlex

    # The model file's time tells a set of a since retrained model at the same path.
    modified = datetime.datetime.fromtimestamp(os.stat(model.path).st_mtime, datetime.UTC)
    return {
        "command": " ".join(shlex.quote(a) for a in ["adr-evaluate", *sys.argv[1:]]),
        "suite": FLAGS.suite,
        "model_path": FLAGS.model_path,
        "model_kind": model.kind,
        "precision": config.precision,
        "resolved_model_path": model.path,
        "model_modified": modified.isoformat(timespec="seconds"),
        "dataset": FLAGS.dataset,
        "split": FLAGS.split,
        "eval_config": config.get_config(),
    }


def _write_report(evaluation, results, checks, model, config):
    try:
        paths = evaluation.write_report(
            results, FLAGS.output_dir, checks=checks, metadata=_provenance(model, config)
        )
    except evaluation.ReportWriteError as e:
        sys.exit(f"adr-evaluate: error: {e.strerror}")
    logging.info("Wrote %s", ", ".join(paths.values()))


def _defense_of(model):
    """The defense a model was trained with, as its files record it, or None.

    A SavedModel of `adr-export`/`adr-train` records it in its export
    metadata; a `.keras` file of `adr-train` in the run's `metrics.json` beside it.
    """
    import json
    import os

    from keras_adr import export

    try:
        if model.kind == "saved_model":
            return export.read_metadata(model.path).get("defense")
        with open(os.path.join(os.path.dirname(model.path), "metrics.json"), encoding="utf-8") as f:
            return json.load(f)["options"]["defense"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _epsilons(values):
    try:
        return [float(v) for v in values]
    except ValueError as e:
        raise app.UsageError(f"--epsilons must be numbers: {e}") from e


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that `--help` does not wait for TensorFlow.
    from keras_adr import data, evaluation

    epsilons = _epsilons(FLAGS.epsilons)
    if FLAGS.num_examples is not None and FLAGS.num_examples < 1:
        sys.exit(f"adr-evaluate: error: --num_examples must be >= 1; got {FLAGS.num_examples}.")
    try:
        config = _config()
    except ValueError as e:
        sys.exit(f"adr-evaluate: error: {e}")
    if FLAGS.output_dir:
        # Before the evaluation, not after it: a bad directory must not cost an hour.
        import os

        if os.path.exists(FLAGS.output_dir) and not os.path.isdir(FLAGS.output_dir):
            sys.exit(f"adr-evaluate: error: --output_dir {FLAGS.output_dir!r} is a file.")
        try:
            os.makedirs(FLAGS.output_dir, exist_ok=True)
        except OSError as e:
            sys.exit(
                f"adr-evaluate: error: --output_dir {FLAGS.output_dir!r} cannot be "
                f"created: {e.strerror}."
            )
        if not os.access(FLAGS.output_dir, os.W_OK | os.X_OK):
            sys.exit(f"adr-evaluate: error: --output_dir {FLAGS.output_dir!r} is not writable.")
    try:
        model = evaluation.load_model(FLAGS.model_path, precision=config.precision)
        dataset = data.load(
            FLAGS.dataset,
            FLAGS.split,
            batch_size=config.batch_size,
            data_dir=FLAGS.data_dir,
            take=config.num_examples,
        )
        if FLAGS.suite == "autoattack":
            checks = _run_autoattack(evaluation, model, dataset, config)
        elif epsilons or FLAGS.sanity_sweep:
            results = evaluation.epsilon_sweep(
                model,
                dataset,
                epsilons,
                config,
                headline_epsilon=config.epsilon,
                include_sanity_epsilons=FLAGS.sanity_sweep,
            )
        else:
            results = evaluation.evaluate_robustness(model, dataset, config)
    except (ValueError, FileNotFoundError, data.DatasetNotFoundError) as e:
        sys.exit(f"adr-evaluate: error: {e}")
    except evaluation.ReportWriteError as e:
        sys.exit(f"adr-evaluate: error: {e.strerror}")

    if FLAGS.suite != "autoattack":
        checks = evaluation.sanity_checks(results)
        print(evaluation.format_summary(results, checks))
        if FLAGS.output_dir:
            _write_report(evaluation, results, checks, model, config)
    failed = [c.name for c in checks if c.failed]
    if failed and not FLAGS.allow_sanity_failures:
        sys.exit(
            f"adr-evaluate: sanity checks failed ({', '.join(failed)}): the robust "
            "accuracy is not trustworthy. Pass --allow_sanity_failures to exit 0 anyway."
        )


def run():
    cli.run_program(main, __name__)


if __name__ == "__main__":
    run()
