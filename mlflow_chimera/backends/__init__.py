"""Backends, by name. Each module is imported only when its backend is asked for, so that
selecting an ONNX Runtime variant never imports torch."""

from __future__ import annotations

import importlib

# name -> (module, class). The order is the default preference when nothing was measured.
_BACKENDS = {
    "onnxruntime": ("mlflow_chimera.backends.onnx_runtime", "OnnxRuntimeBackend"),
    "aotinductor": ("mlflow_chimera.backends.aotinductor", "AOTInductorBackend"),
    "torch_compile": ("mlflow_chimera.backends.torch_compile", "TorchCompileBackend"),
    "eager": ("mlflow_chimera.backends.eager", "EagerBackend"),
}

DEFAULT_ORDER = tuple(_BACKENDS)


def names() -> list:
    return list(_BACKENDS)


def get(name: str):
    """The backend called ``name``, or the class a ``"package.module:Class"`` spec names;
    a clear error lists the known ones."""
    if ":" in name:
        module, cls = name.split(":", 1)
    else:
        try:
            module, cls = _BACKENDS[name]
        except KeyError:
            raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_BACKENDS)} "
                             "(or 'package.module:Class')") from None
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"backend {name!r} cannot be imported: {exc}") from exc
