"""Publishes the reference model: the best validation row of adr-train's defaults study.

Among the models `frontier_defaults.py` evaluated on the validation split
(adr-train's default recipe and the changes the frontier measured, seed 0),
the one with the best validation worst case (today's default on a tie) is
exported with `keras_adr.export.export_saved_model` as the next version of
`saved_models/fashion_mnist_adr`. The test-set numbers of its row go into
the metadata; they play no part in the choice.

Usage (from the repository root, after `robustness.py --preset=frontier` and
`frontier_defaults.py`):
    python -m benchmarks.export_reference --workdir=runs/benchmarks/frontier
    python -m benchmarks.export_reference --dry_run   # print the choice only
"""

import json
import os

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_REPO, "benchmarks", "results")

FLAGS = flags.FLAGS


def _define_flags():
    """The command line (defined when run, so that tests can import the module)."""
    flags.DEFINE_string(
        "defaults_summary",
        os.path.join(_RESULTS, "frontier_defaults.json"),
        "The validation comparison of frontier_defaults.py.",
    )
    flags.DEFINE_string(
        "rows_dir", os.path.join(_RESULTS, "frontier_rows"), "Finished rows of the frontier study."
    )
    flags.DEFINE_string(
        "workdir",
        os.path.join(_REPO, "runs", "benchmarks", "frontier"),
        "The frontier's run directories (<workdir>/<row>/best.keras).",
    )
    flags.DEFINE_string(
        "export_dir",
        os.path.join(_REPO, "saved_models", "fashion_mnist_adr"),
        "TF Serving base directory of the reference model.",
    )
    flags.DEFINE_string(
        "models_config",
        os.path.join(_REPO, "saved_models", "models.config"),
        "TF Serving model config file written for the reference model.",
    )
    flags.DEFINE_string(
        "serving_base_path",
        "/models/fashion_mnist_adr",
        "The model's base path as the server sees it (in its container).",
    )
    flags.DEFINE_bool("dry_run", False, "Print the chosen row, export nothing.")


def choose(models):
    """The evaluated model of best validation worst case (the first, today's default, on a tie)."""
    return max(models, key=lambda m: m["robust_accuracy"])


def train_command(row):
    """The adr-train command that trains as the row's benchmark run did."""
    from keras_adr import presets
    from keras_adr.config import FLOAT_FIELDS

    attack = row["adr_config"]["attack"]
    preset = presets.get(row["defense"])
    flags_ = [
        f"--defense={row['defense']}",
        "--epochs=10",
        f"--epsilon={attack['epsilon']:g}",
        f"--attack_steps={attack['steps']}",
        f"--step_size={attack['step_size']:g}",
        f"--precision={row['precision']}",
        f"--seed={row['seed']}",
    ]
    if row.get("validation_epsilon") not in (None, attack["epsilon"]):
        flags_.append(f"--validation_epsilon={row['validation_epsilon']:g}")
    # Every float field the row's config holds apart from the library
    # preset's (the studies pin their ADR weights; the library's may move).
    recorded = row["adr_config"]
    flags_ += [
        f"--{k}={recorded[k]:g}"
        for k in FLOAT_FIELDS
        if k in recorded and getattr(preset, k) != recorded[k]
    ]
    if row.get("ema_momentum"):
        flags_.append(f"--ema_momentum={row['ema_momentum']:g}")
    return "adr-train " + " ".join(flags_)


def main(argv):
    del argv
    with open(FLAGS.defaults_summary) as f:
        summary = json.load(f)
    if summary["decision"].get("not_evaluated"):
        raise SystemExit(
            f"{FLAGS.defaults_summary} is provisional (not evaluated yet: "
            f"{', '.join(summary['decision']['not_evaluated'])}); run "
            "benchmarks/frontier_defaults.py when those rows have finished."
        )
    chosen = choose(summary["models"])
    with open(os.path.join(FLAGS.rows_dir, chosen["row"] + ".json")) as f:
        row = json.load(f)
    print(
        f"chosen: {row['name']} ({chosen['change']}), validation worst case "
        f"{chosen['robust_accuracy']:.4f}, among {[m['row'] for m in summary['models']]}"
    )
    if FLAGS.dry_run:
        return

    import keras
    import numpy as np
    import tensorflow as tf

    from keras_adr import data, export

    checkpoint = os.path.join(FLAGS.workdir, row["name"], "best.keras")
    model = keras.saving.load_model(checkpoint, compile=False)
    metadata = {
        "dataset": "fashion_mnist",
        "class_names": list(data.info("fashion_mnist").class_names),
        "defense": row["defense"],
        "adr_config": row["adr_config"],
        "ema_momentum": row.get("ema_momentum", 0.0),
        "training_precision": row["precision"],
        "attack_budget": {
            "norm": row["adr_config"]["attack"]["norm"],
            "epsilon": row["adr_config"]["attack"]["epsilon"],
        },
        "robustness": row["evaluation"],
        "command": (
            f"python -m benchmarks.robustness --preset=frontier --rows={row['name']} "
            f"(trains as `{train_command(row)}` would: see docs/benchmarks.md)"
        ),
        "trained_by": row.get("trained_by"),
        "selection": {
            "models": [m["row"] for m in summary["models"]],
            "chosen": row["name"],
            "by": "best worst case on the 2,000 validation images (frontier_defaults.md)",
            "validation": {k: chosen[k] for k in ("split", "clean_accuracy", "robust_accuracy")},
        },
        "benchmark_row": os.path.relpath(
            os.path.join(FLAGS.rows_dir, row["name"] + ".json"), _REPO
        ),
    }
    test = data.load("fashion_mnist", "test", batch_size=250, take=1000)
    predicted = lambda fn: np.concatenate([np.asarray(fn(images)) for images, _ in test])
    labels = np.concatenate([labels.numpy() for _, labels in test])
    clean = float(
        np.mean(
            np.argmax(predicted(lambda images: model.backbone(images, training=False)), axis=1)
            == labels
        )
    )
    metadata["reference_check"] = {
        "clean_accuracy_first_1000_test": clean,
        "num_examples": len(labels),
        "how": "serving_default signature on keras_adr.data.load('fashion_mnist', 'test', "
        "take=1000)",
    }
    path = export.export_saved_model(model.backbone, FLAGS.export_dir, metadata=metadata)
    # The exported signature must give the recorded number.
    serve = tf.saved_model.load(path).signatures["serving_default"]
    served = float(np.mean(predicted(lambda images: serve(images=images)["classes"]) == labels))
    if abs(served - clean) > 1e-9:
        raise RuntimeError(
            f"the export classifies {served:.4f} of the check images correctly, "
            f"the checkpoint {clean:.4f}"
        )
    export.write_models_config(
        FLAGS.models_config, os.path.basename(FLAGS.export_dir), FLAGS.serving_base_path
    )
    print(
        f"exported {checkpoint} to {path}; clean accuracy on the first 1000 test images "
        f"{clean:.4f}; {FLAGS.models_config} serves {FLAGS.serving_base_path}"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
