"""mlflow-chimera: one logged PyTorch model, many compiled variants, the fastest valid one
served on every host.

Importing this package is cheap: torch, onnxruntime and MLflow's model machinery are imported
only when a function that needs them is called. The package is also reachable as
``mlflow.chimera`` (see :mod:`mlflow_chimera._alias`).

Public API: :func:`save_model`, :func:`log_model`, :func:`load_model` (MLflow flavor
conventions), :func:`benchmark` (time a logged model's variants on this host and store the
result for its host class) and ``_load_pyfunc`` (the ``loader_module`` entry point MLflow calls).
"""

from __future__ import annotations

__version__ = "0.1.0"
FLAVOR_NAME = "chimera"

_LAZY = {
    "save_model": "mlflow_chimera.flavor",
    "log_model": "mlflow_chimera.flavor",
    "load_model": "mlflow_chimera.flavor",
    "get_default_pip_requirements": "mlflow_chimera.flavor",
    "_load_pyfunc": "mlflow_chimera.pyfunc",
    "benchmark": "mlflow_chimera.host_benchmark",
}

__all__ = ["FLAVOR_NAME", "__version__", "save_model", "log_model", "load_model", "benchmark"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_chimera' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


from mlflow_chimera import _alias  # noqa: E402

_alias.install()
