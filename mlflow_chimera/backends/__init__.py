"""Backends, by name. Each module is imported only when its backend is asked for, so that
selecting an ONNX Runtime variant never imports torch.

The registered set is this package's backends plus those other packages declare in the
``mlflow_chimera.backends`` entry-point group (``name = "package.module:Class"``). A loader
looks backends up only in that set: a name in a variant record that is not registered is
refused, never imported. ``log_model(backends=["package.module:Class"])`` may still name an
unregistered class to *build* with — that is the author's own code on the author's machine —
but the variants it builds load only where that backend is registered.
"""

from __future__ import annotations

import importlib

ENTRY_POINT_GROUP = "mlflow_chimera.backends"

# name -> "module:Class". The order is the default preference when nothing was measured.
_BUILTIN = {
    "onnxruntime": "mlflow_chimera.backends.onnx_runtime:OnnxRuntimeBackend",
    "openvino": "mlflow_chimera.backends.openvino_backend:OpenVINOBackend",
    "aotinductor": "mlflow_chimera.backends.aotinductor:AOTInductorBackend",
    "torch_compile": "mlflow_chimera.backends.torch_compile:TorchCompileBackend",
    "eager": "mlflow_chimera.backends.eager:EagerBackend",
}

DEFAULT_ORDER = tuple(_BUILTIN)
_registered: dict | None = None


class UnknownBackendError(ValueError):
    """A backend name that is not registered (or cannot be imported)."""


def registered() -> dict:
    """{name: "module:Class"}: the built-in backends and the entry-point group's."""
    global _registered
    if _registered is None:
        from importlib.metadata import entry_points

        found = dict(_BUILTIN)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(ep.name, ep.value)
        _registered = found
    return _registered


def names() -> list:
    return list(registered())


def _instantiate(spec: str, name: str):
    module, _, cls = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise UnknownBackendError(f"backend {name!r} cannot be imported: {exc}") from exc


def get(name: str):
    """The registered backend called ``name``; anything else is refused with the known names."""
    # A built-in name wins over the entry-point group anyway, and scanning every installed
    # distribution's entry points costs tens of milliseconds at each cold start.
    spec = _BUILTIN.get(name) or registered().get(name)
    if spec is None:
        raise UnknownBackendError(f"backend {name!r} is not registered; registered backends: "
                                  f"{', '.join(registered())}")
    return _instantiate(spec, name)


def for_build(name: str):
    """A backend to build with: a registered name, or ``"package.module:Class"`` (the caller's
    own code, on the caller's machine)."""
    if name in _BUILTIN or name in registered() or ":" not in name:
        return get(name)
    return _instantiate(name, name)
