"""Shared by the benchmark scripts: result files, markdown tables, machine information.

Rows (one finished measurement each, resumable) are written atomically with
sorted keys (`write_json_atomic`); whole results with their markdown report
go through `write_results`; `machine_info` records where a number was
measured.
"""

import json
import os
import platform

from keras_adr import fileio

# --- Files ---------------------------------------------------------------------


def write_json_atomic(path, payload):
    """Writes a complete file or leaves the old one (a row must never be half written)."""
    fileio.write_json(path, payload)


def read_json(path):
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_text(path, text):
    """Writes `text` to `path` atomically, creating the directory."""
    fileio.write_text(path, text)


def write_results(path, results, markdown=None):
    """Writes `results` to `path` as indented JSON, and `markdown` beside it as `.md`.

    Args:
        path: The JSON file; its directory is created.
        results: JSON-serialisable results (other values are written as strings).
        markdown: Optional report text, written to `path` with the extension `.md`.
    """
    write_text(path, json.dumps(results, indent=2, default=str) + "\n")
    if markdown is not None:
        write_text(os.path.splitext(path)[0] + ".md", markdown)


# --- Markdown ------------------------------------------------------------------


def markdown_table(header, rows, align=None):
    """The lines of a markdown table.

    Args:
        header: Column titles.
        rows: Rows of cells (formatted as `str`).
        align: One character per column, `"l"` (left) or `"r"` (right);
            default: the first column left, the others right.

    Returns:
        List of lines: header, rule, one line per row.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(
            f"`align` needs one character per column; got {align!r} for {len(header)} columns."
        )
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return [table_row(header), rule, *(table_row(row) for row in rows)]


def table_row(cells):
    """One markdown table line of `cells`."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


# --- Machine -------------------------------------------------------------------


def cpu_info():
    """`(name, flags)` of this machine's CPU.

    The model name and feature flags of `/proc/cpuinfo`; where there is none,
    the platform's processor name and no flags.
    """
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return name, flags
    name = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), flags
    )
    return name, flags


def machine_info(**extra):
    """Where a result was measured: CPU, core count, GPUs and library versions.

    Args:
        **extra: More entries (e.g. load averages), added at the end.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "cpu": cpu_info()[0],
        "cpus": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        **extra,
    }


# --- Threads -------------------------------------------------------------------


def set_threads(threads, inter_op_threads=0):
    """TensorFlow intra- and inter-op threads (0 = TensorFlow's choice).

    For these small models two processes of one thread each get more from
    two cores than one process of two threads. `inter_op_threads`, if not
    0, sets the inter-op pool alone, over `threads`.
    """
    if not (threads or inter_op_threads):
        return
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)


def target_lines(title, targets, spec=".3f"):
    """Markdown lines: `title`, then each target's value and whether it is met.

    `targets`: dicts with `target` (its wording), `value` and `met`; none
    gives no lines.
    """
    if not targets:
        return []
    return ["", title, ""] + [
        f"- {t['target']}: {t['value']:{spec}} -> **{'met' if t['met'] else 'not met'}**"
        for t in targets
    ]
