"""Small torch modules used by builds. Imports torch: import this module only inside a build."""

from __future__ import annotations

import torch


class TraceableProgram(torch.nn.Module):
    """An exported program's module in a form the TorchScript tracer accepts.

    The tracer toggles ``train()``, which the module of an ``ExportedProgram`` refuses (the
    program is captured in eval mode already, so toggling is a no-op here), and passes inputs
    by position, while the program takes them by name.
    """

    def __init__(self, program_module, input_names: list):
        super().__init__()
        self.program = program_module
        self._input_names = list(input_names)

    def train(self, mode: bool = True):
        return self

    def forward(self, *args):
        # The tracer passes every input by position; the program takes them by name.
        return self.program(**dict(zip(self._input_names, args)))


class FlatOutputs(torch.nn.Module):
    """The user's model as it is captured: every input by name, outputs flattened to a tuple of
    tensors in the order :func:`mlflow_chimera.reference.flatten_named` gives them.

    Exporting this module instead of the model itself keeps the model's own output classes
    (``transformers``' ``ModelOutput`` dataclasses, caches, …) out of the reference program, so
    build children and serving hosts read it without the model's Python package. ``constants``
    are keyword arguments fixed at capture (``use_cache=False``).
    """

    def __init__(self, model, input_names: list, n_positional: int, constants: dict):
        super().__init__()
        self.model = model
        self._input_names = list(input_names)
        self._n_positional = n_positional
        self._constants = dict(constants)

    def _call_model(self, named: dict):
        names = self._input_names
        args = [named[n] for n in names[: self._n_positional]]
        kwargs = {n: named[n] for n in names[self._n_positional:]}
        return self.model(*args, **kwargs, **self._constants)

    def forward(self, *args, **kwargs):
        from mlflow_chimera.reference import flatten_named

        named = dict(zip(self._input_names, args), **kwargs)
        return tuple(t for _, t in flatten_named(self._call_model(named))[0])


def flat_outputs(model, input_names: list, n_positional: int, constants: dict) -> FlatOutputs:
    """A :class:`FlatOutputs` whose ``forward`` names its parameters after the model's inputs,
    as ``torch.export`` matches ``dynamic_shapes`` and keyword inputs against that signature."""
    import inspect

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in input_names]

    def forward(self, *args, **kwargs):
        return FlatOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(params)
    cls = type("FlatOutputs", (FlatOutputs,), {"forward": forward})
    return cls(model, input_names, n_positional, constants)
