"""The module map: each `keras_adr.<name>` of the docs is reachable from `import keras_adr`."""

import glob
import importlib
import json
import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = [os.path.join(_ROOT, "README.md"), *sorted(glob.glob(os.path.join(_ROOT, "docs", "*.md")))]
_REFERENCE = re.compile(r"\bkeras_adr(?:\.[A-Za-z_]\w*)+")


def _references():
    found = set()
    for path in _DOCS:
        with open(path) as f:
            found.update(_REFERENCE.findall(f.read()))
    return sorted(found)


def _resolve(reference):
    """The object `reference` names, by attribute access from `import keras_adr` only."""
    value = importlib.import_module("keras_adr")
    for name in reference.split(".")[1:]:
        value = getattr(value, name)
    return value


def test_the_docs_reference_the_module_map():
    # Guards the test below against walking nothing.
    assert "keras_adr.precision.resolve" in _references()


def test_docs_references_are_reachable_after_import_keras_adr():
    # One fresh interpreter for all of them, so that modules imported by other
    # tests (or by this file) do not make a missing import pass.
    code = (
        "import json, sys\n"
        "import keras_adr\n"
        "missing = []\n"
        "for reference in json.loads(sys.argv[1]):\n"
        "    value = keras_adr\n"
        "    try:\n"
        "        for name in reference.split('.')[1:]:\n"
        "            value = getattr(value, name)\n"
        "    except AttributeError:\n"
        "        missing.append(reference)\n"
        "print(json.dumps(missing))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(_references())],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_all_names_every_public_module():
    import keras_adr

    modules = {
        name
        for name in os.listdir(os.path.join(_ROOT, "keras_adr"))
        if not name.startswith("_") and name != "cli"
    }
    modules = {name.removesuffix(".py") for name in modules}
    assert modules <= set(keras_adr.__all__)
    for name in keras_adr.__all__:
        assert _resolve(f"keras_adr.{name}") is getattr(keras_adr, name)
