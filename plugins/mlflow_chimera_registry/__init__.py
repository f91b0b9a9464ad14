"""mlflow-chimera-registry: an MLflow model registry store (entry-point group
``mlflow.model_registry_store``, schemes ``chimera+sqlite``, ``chimera+postgresql``, …) that
tags each new version of an mlflow-chimera model with the model's ``chimera.*`` facts.

Runs on a tracking server that has MLflow and nothing of mlflow-chimera: this package imports
only MLflow (never torch, onnxruntime or ``mlflow_chimera``). MLflow imports this module while
it builds its store registry, so it stays cheap; the store itself is in :mod:`.store`.
"""

from __future__ import annotations

__version__ = "0.1.0"

SCHEME_PREFIX = "chimera+"


def build_store(store_uri: str, tracking_uri: str | None = None):
    """Store builder for every ``chimera+<database>`` scheme (MLflow calls it with the registry
    URI and, where it knows one, the tracking URI)."""
    from mlflow_chimera_registry.store import build_store as _build

    return _build(store_uri, tracking_uri=tracking_uri)


__all__ = ["SCHEME_PREFIX", "build_store"]
