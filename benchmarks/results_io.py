"""Writing benchmark results: one JSON file, created with its directory."""

import json
import os


def write_json(results, path):
    """Writes `results` to `path` (indented JSON), creating the directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
