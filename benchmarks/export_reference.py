"""Publishes the reference model: the best `adr_pgd` model of the fmnist benchmark.

Among the finished `adr_pgd` rows of `results/fmnist_rows/` (any seed), the
one with the highest robust validation accuracy (PGD-5 on the 2,000 held-out
training images, the value its checkpoint was selected by) is exported with
`keras_adr.export.export_saved_model` as the next version of
`saved_models/fashion_mnist_adr`. The test-set numbers of its row go into the
metadata; they play no part in the choice.

Usage (from the repository root, after `robustness.py --preset=fmnist`):
    python -m benchmarks.export_reference
    python -m benchmarks.export_reference --dry_run   # print the choice only
"""

import glob
import json
import os

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "rows_dir",
    os.path.join(_REPO, "benchmarks", "results", "fmnist_rows"),
    "Finished rows of the fmnist benchmark.",
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
flags.DEFINE_string("defense", "adr_pgd", "Defense whose rows are candidates.")
flags.DEFINE_bool("dry_run", False, "Print the chosen row, export nothing.")


def choose(rows):
    """The row with the best validation robust accuracy (ties: lower seed)."""

    def best_validation(row):
        values = [v for v in row["history"].get("val_adv_accuracy", []) if v is not None]
        return max(values) if values else -1.0

    return max(rows, key=lambda row: (best_validation(row), -row["seed"])), best_validation


def main(argv):
    del argv
    rows = []
    for path in sorted(glob.glob(os.path.join(FLAGS.rows_dir, "*.json"))):
        with open(path) as f:
            row = json.load(f)
        if row["defense"] == FLAGS.defense and not row["overrides"] and row.get("history"):
            rows.append(row)
    if not rows:
        raise app.UsageError(
            f"No finished {FLAGS.defense} rows with a history in "
            f"{FLAGS.rows_dir}; run benchmarks/robustness.py --preset=fmnist."
        )
    row, best_validation = choose(rows)
    print(
        f"chosen: {row['name']} (seed {row['seed']}), best validation PGD-5 accuracy "
        f"{best_validation(row):.4f}, among {[r['name'] for r in rows]}"
    )
    if FLAGS.dry_run:
        return

    import keras
    import numpy as np
    import tensorflow as tf

    from keras_adr import data, export

    checkpoint = os.path.join(_REPO, row["checkpoint"])
    model = keras.saving.load_model(checkpoint, compile=False)
    metadata = {
        "dataset": "fashion_mnist",
        "class_names": list(data.info("fashion_mnist").class_names),
        "defense": row["defense"],
        "adr_config": row["adr_config"],
        "attack_budget": {
            "norm": row["adr_config"]["attack"]["norm"],
            "epsilon": row["adr_config"]["attack"]["epsilon"],
        },
        "robustness": row["evaluation"],
        "command": (
            f"python benchmarks/robustness.py --preset=fmnist --rows={row['name']} "
            "(trained as `adr-train --epochs=10` would: see benchmarks/README.md)"
        ),
        "trained_by": row.get("trained_by"),
        "selection": {
            "rows": [r["name"] for r in rows],
            "chosen": row["name"],
            "by": "best val_adv_accuracy (PGD-5, 2,000 held-out training images)",
            "val_adv_accuracy": best_validation(row),
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
    app.run(main)
