"""Make this package reachable as ``mlflow.chimera``.

MLflow has no entry point for flavors, but it loads ``mlflow.run_context_provider`` entry
points while ``import mlflow`` runs. Ours (:mod:`mlflow_chimera._plugin`) imports this package,
which puts it in ``sys.modules["mlflow.chimera"]`` and sets ``mlflow.chimera``; so after
installation ``import mlflow.chimera`` and ``from mlflow import chimera`` work in a fresh
interpreter. ``loader_module`` in MLmodel stays the real name, ``mlflow_chimera``.
"""

from __future__ import annotations

import sys

ALIAS = "mlflow.chimera"


def install() -> None:
    package = sys.modules["mlflow_chimera"]
    sys.modules.setdefault(ALIAS, package)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and getattr(mlflow, "chimera", None) is not package:
        mlflow.chimera = package
