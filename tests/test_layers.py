"""The package's layers: every import (also those inside functions) points down or sideways,
never up, and the imports made at module level form no cycle.

Read from the source with ``ast``, so the check sees what the code says, not what one run
happened to import. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlflow_chimera"

# Lowest first. A module may import modules of its own layer or of layers below it.
LAYERS = [
    # records and facts: no chimera imports that reach higher
    ["errors", "manifest", "host", "signing", "summary", "compile", "compile.timing", "batching", "_alias"],
    # files on disk and in the tracking store
    ["reference", "cache", "tracking_reads", "remembered_models"],
    # backends (each a builder and a loader behind base.py) and what builds on them alone
    ["backends", "backends.base", "backends.torch_modules", "backends.torch_runner", "backends.onnx_runtime",
     "backends.openvino_backend", "backends.aotinductor", "backends.torch_compile", "backends.eager",
     "capture", "compile.parity"],
    # deciding: what is trusted, what ranks first
    ["trust", "selection"],
    # assembling: the variant catalog; the build pipeline
    ["catalog", "compile.isolation", "compile.worker", "compile.buildserver", "compile.pipeline"],
    # the loaded model; what is shown about a model
    ["runtime", "report", "tracking"],
    # MLflow faces and workflows
    ["host_benchmark", "publish", "pyfunc", "flavor"],
    # entry points
    ["cli", "demo", "_plugin", "models_repository"],
]
LAYER = {module: i for i, names in enumerate(LAYERS) for module in names}


def _modules() -> dict:
    """{dotted name relative to the package: path} of every module in the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict) -> list:
    """[(imported module, at module level?)] of the package's own modules that ``path`` imports.
    ``from mlflow_chimera import x`` counts as importing submodule ``x`` where there is one;
    the package root itself (version, lazy public API) is left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}"[len("mlflow_chimera."):] in modules else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("mlflow_chimera."):
                edges.append((name[len("mlflow_chimera."):], id(node) in top_level))
    return edges


MODULES = _modules()


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER)) == [], "add the new module(s) to LAYERS in tests/test_layers.py"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_or_sideways(module):
    upward = [(imported, LAYERS[LAYER[imported]]) for imported, _ in _imports(MODULES[module], MODULES)
              if imported in LAYER and module in LAYER and LAYER[imported] > LAYER[module]]
    assert upward == [], f"{module} (layer {LAYER.get(module)}) imports a higher layer: {upward}"


def test_module_level_imports_have_no_cycle():
    graph = {m: {i for i, top in _imports(path, MODULES) if top and i != m} for m, path in MODULES.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
