"""The module layers of keras_adr, checked on the import graph (also imports inside functions).

A module may import modules of its own layer or of lower ones, never of a
higher one, and the graph has no cycle. docs/architecture.md shows the same
layers.
"""

import ast
import os

import pytest

_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "keras_adr")

# Bottom to top, by the first name under keras_adr (a subpackage is one unit).
LAYERS = (
    # foundations: no keras_adr imports but each other's
    ("_version", "_startup", "_checks", "_keras_compat", "fileio", "graph"),
    # configuration and building blocks
    ("config", "precision", "data", "layers", "pairwise"),
    ("specs", "presets", "models", "losses", "_model_inputs", "signatures"),
    # the recipe, the objective, the attacks, the distribution helpers
    ("recipe", "objective", "attacks", "distribute", "rundir"),
    # training, evaluation, export and serving
    ("_training_metrics", "training", "adr_model"),
    ("callbacks", "evaluation", "export", "serving"),
    # what a run is built from
    ("_run_inputs", "_run_history"),
    ("pipeline",),
    ("cli",),
)
# The package's `__init__` re-exports everything: it is above every layer,
# and no module may import it (`import keras_adr`).
_FACADE = "keras_adr"


def _unit(module):
    """`keras_adr.evaluation.suite` -> `evaluation`; the package itself -> `keras_adr`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else _FACADE


def _modules(package_dir):
    """`{dotted name: path}` of every module under `package_dir` (named `keras_adr`)."""
    root = os.path.dirname(package_dir)
    found = {}
    for directory, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def import_edges(package_dir):
    """`{(importing unit, imported unit)}` between different units, with a line for each."""
    modules = _modules(package_dir)
    edges = {}
    for module, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from keras_adr import x` imports the module keras_adr.x if there is one.
                targets = [
                    f"{node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in modules
                    else node.module
                    for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] != "keras_adr":
                    continue
                a, b = _unit(module), _unit(target)
                if a != b:
                    edges.setdefault((a, b), f"{path}:{node.lineno}")
    return edges


def find_cycle(edges):
    """A list of units forming a cycle, or None."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def layer_violations(edges, layers=LAYERS):
    """Imports of a higher layer, of the facade, or by/of a unit in no layer."""
    level = {unit: i for i, units in enumerate(layers) for unit in units}
    bad = []
    for (a, b), where in sorted(edges.items()):
        if a == _FACADE:
            continue
        if b == _FACADE:
            bad.append(f"{where}: {a} imports the package facade `keras_adr`")
        elif a not in level or b not in level:
            bad.append(f"{where}: {a} -> {b}: a unit in no layer (add it to LAYERS)")
        elif level[b] > level[a]:
            bad.append(f"{where}: {a} (layer {level[a]}) imports {b} (layer {level[b]})")
    return bad


def test_the_library_has_no_import_cycle():
    assert find_cycle(import_edges(_PACKAGE)) is None


def test_no_module_imports_a_higher_layer():
    assert layer_violations(import_edges(_PACKAGE)) == []


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules(_PACKAGE)} - {_FACADE}
    assert units == {u for layer in LAYERS for u in layer}


@pytest.fixture
def planted(tmp_path):
    """A copy-free fake package: config imports training lazily, inside a function."""
    package = tmp_path / "keras_adr"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def f():\n    from keras_adr import training\n")
    (package / "training.py").write_text("from keras_adr import config\n")
    return str(package)


def test_a_planted_cycle_fails(planted):
    edges = import_edges(planted)
    assert find_cycle(edges) in (
        ["config", "training", "config"],
        ["training", "config", "training"],
    )
    assert any("config (layer 1) imports training" in v for v in layer_violations(edges))


def test_no_library_module_is_over_400_lines():
    long = {
        path: n for path in _modules(_PACKAGE).values() if (n := sum(1 for _ in open(path))) > 400
    }
    assert long == {}
