"""Capture: the user's model, as they hand it over, turned into the reference program.

``capture`` names the example's inputs after ``model.forward``, wraps the model so that its
outputs — a tensor, tuples, dicts, ``transformers`` ``ModelOutput`` dataclasses — come out as
a flat tuple of named tensors (:class:`~mlflow_chimera.backends.torch_modules.FlatOutputs`),
checks that the eager model is usable at all (finite, deterministic outputs), and exports the
wrapper with ``torch.export`` with a dynamic batch (and any other dynamic dimensions asked for).

The model is captured in eval mode and handed back exactly as it came: every submodule's
training flag is restored, on success and on failure.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import numpy as np

from mlflow_chimera.errors import ChimeraError
from mlflow_chimera.manifest import TensorInfo
from mlflow_chimera.reference import MAX_BATCH, Signature, _to_numpy, flatten_named

_logger = logging.getLogger("mlflow.chimera")

# Keyword switches that make a model return only tensors; set when the model takes them and the
# example does not say otherwise (a decoder's key/value cache is not served).
_CAPTURE_SWITCHES = {"use_cache": False}


class CaptureError(ChimeraError):
    """The model cannot be captured or served as handed over; the message says why."""


@dataclass
class Captured:
    program: object  # torch.export.ExportedProgram of the FlatOutputs wrapper
    signature: Signature
    example: dict  # {input name: ndarray}
    eager: object  # the wrapper module: the eager reference every variant must match
    eager_outputs: list  # [ndarray] for the example
    dropped_outputs: list  # names of non-tensor outputs left out
    constants: dict  # keyword switches fixed at capture


def normalize_example(model, input_example) -> tuple[dict, int]:
    """Name the example's tensors after ``model.forward``'s parameters.

    Accepts one array/tensor, a tuple or list of them (positional), or a dict (named; optional
    inputs may be left out). Returns ``({name: ndarray}, n_positional)`` in the order the model
    takes them; the first ``n_positional`` are passed by position.
    """
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(input_example, dict):
        unknown = set(input_example) - {p.name for p in params}
        if unknown:
            raise CaptureError(
                f"input_example has keys {sorted(unknown)} that {type(model).__name__}.forward "
                f"does not take; its parameters are {[p.name for p in params]}"
            )
        named = {p.name: _to_numpy(input_example[p.name]) for p in params
                 if p.name in input_example and input_example[p.name] is not None}
    else:
        values = list(input_example) if isinstance(input_example, (tuple, list)) else [input_example]
        if len(values) > len(positional):
            raise CaptureError(
                f"input_example has {len(values)} tensors but {type(model).__name__}.forward "
                f"takes {len(positional)} positional inputs ({positional})"
            )
        named = {name: _to_numpy(v) for name, v in zip(positional, values)}
    n_positional = 0
    for name in positional:  # by position up to the first parameter the example leaves out
        if name not in named:
            break
        n_positional += 1
    for name, arr in named.items():
        if arr.ndim == 0:
            raise CaptureError(f"input {name!r} is a scalar; chimera needs a batch dimension first")
        if arr.dtype.kind not in "biuf":
            raise CaptureError(f"input {name!r} has dtype {arr.dtype}; expected numbers or booleans")
    batches = {arr.shape[0] for arr in named.values()}
    if len(batches) != 1:
        raise CaptureError(f"inputs disagree on the batch size: {({n: a.shape for n, a in named.items()})}")
    return named, n_positional


def _switches(model, named: dict) -> dict:
    params = inspect.signature(model.forward).parameters
    has_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in _CAPTURE_SWITCHES.items()
            if k not in named and (k in params or (has_kwargs and _config_has(model, k)))}


def _config_has(model, key: str) -> bool:
    return hasattr(getattr(model, "config", None), key)


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    if model.training and not getattr(model, "_chimera_in_eval_mode", False):
        _logger.warning("chimera: the model came in training mode; it is captured in eval mode "
                        "(dropout off, batch norm statistics frozen) and handed back in training mode")
    model.eval()
    outermost = not getattr(model, "_chimera_in_eval_mode", False)
    object.__setattr__(model, "_chimera_in_eval_mode", True)
    try:
        yield model
    finally:
        if outermost:
            object.__delattr__(model, "_chimera_in_eval_mode")
            for module, flag in flags:
                module.training = flag


def _dynamic_dims(named: dict, dynamic_shapes: dict | None):
    """torch.export ``dynamic_shapes`` (batch always dynamic) and the signature's shapes."""
    import torch

    dims = {"batch": torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    spec, shapes = {}, {}
    requested = dynamic_shapes or {}
    unknown = sorted(set(requested) - set(named))
    if unknown:
        raise CaptureError(f"dynamic_shapes names {unknown}, which are not inputs; inputs are {list(named)}")
    for name, arr in named.items():
        axes = {0: "batch"}
        for axis, label in (requested.get(name) or {}).items():
            axis = int(axis)
            if not 0 < axis < arr.ndim:
                raise CaptureError(f"dynamic_shapes[{name!r}] names axis {axis}; {name!r} has axes 1..{arr.ndim - 1} "
                                   "besides the batch (axis 0, always dynamic)")
            if not str(label).isidentifier():
                raise CaptureError(f"dynamic_shapes[{name!r}][{axis}] = {label!r}: expected a name like 'sequence'")
            axes[axis] = str(label)
        # Other axes: torch.export finds the range the model allows (a BERT's sequence is bounded
        # by its position embeddings) and which axes must agree; the ranges are recorded below.
        spec[name] = {axis: dims["batch"] if label == "batch" else torch.export.Dim.DYNAMIC
                      for axis, label in axes.items()}
        shapes[name] = [-1 if axis in axes else d for axis, d in enumerate(arr.shape)]
    labels = {name: {axis: label for axis, label in ({0: "batch"} | {int(a): str(v) for a, v in
                                                                     (requested.get(name) or {}).items()}).items()}
              for name in named}
    return spec, shapes, labels


def _check_usable(outputs: list, again: list, names: list) -> None:
    """Refuse, before anything is built, a model whose eager outputs cannot be served."""
    if not names:
        raise CaptureError("the model returned no tensors; chimera serves tensor outputs")
    for name, first, second in zip(names, outputs, again):
        if first.dtype.kind == "f" and not np.all(np.isfinite(first)):
            bad = int(first.size - np.count_nonzero(np.isfinite(first)))
            raise CaptureError(f"the eager model's output {name!r} has {bad} NaN/Inf value(s) on the input "
                               "example: no variant could be checked against it")
        if first.shape != second.shape or not np.array_equal(first, second, equal_nan=True):
            raise CaptureError(f"non-deterministic forward: output {name!r} differs between two eager calls "
                               "on the same input (dropout in train mode, or random ops in forward?)")


def _output_shapes(program, outputs: list) -> list:
    """Each output's shape with -1 wherever the program says it is dynamic (the batch, and
    axes that follow a dynamic input axis)."""
    node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") for a in node.args[0]][-len(outputs):]
    shapes = []
    for value, array in zip(values, outputs):
        dims = list(getattr(value, "shape", array.shape))
        shapes.append([-1 if i == 0 or not isinstance(d, int) else int(d) for i, d in enumerate(dims)])
    return shapes


def _bound(value, default: int) -> int:
    """A range bound as an int; ``default`` for an unbounded one (torch's ``int_oo`` claims to be
    finite, and ``int()`` of it fails inside sympy)."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return default


def _axis_ranges(program, labels: dict) -> dict:
    """{label: [min, max]} of every dynamic axis besides the batch, as the export found them."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = [placeholders[name] for name in program.graph_signature.user_inputs]
    ranges = {}
    for node, (name, axes) in zip(user_inputs, labels.items()):
        shape = getattr(node.meta.get("val"), "shape", ())
        for axis, label in axes.items():
            if axis == 0 or axis >= len(shape) or isinstance(shape[axis], int):
                continue
            bounds = program.range_constraints.get(shape[axis].node.expr)
            lower = _bound(bounds.lower, 2) if bounds is not None else 2
            upper = _bound(bounds.upper, MAX_BATCH) if bounds is not None else MAX_BATCH
            previous = ranges.get(label, [lower, upper])
            ranges[label] = [max(lower, previous[0]), min(upper, previous[1])]
    return ranges


def capture(model, input_example, dynamic_shapes: dict | None = None) -> Captured:
    """Export ``model`` as the reference program (see the module docstring).

    ``dynamic_shapes`` names extra dynamic axes per input, e.g.
    ``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}`` (axes sharing a name
    share a size). The batch (axis 0) is always dynamic. An example of batch 1 is tiled to
    batch 2 for the export only, because ``torch.export`` specialises a size-1 dimension.
    """
    import torch

    from mlflow_chimera.backends.torch_modules import flat_outputs

    named, n_positional = normalize_example(model, input_example)
    constants = _switches(model, named)
    names = list(named)
    with eval_mode(model), torch.no_grad():  # nested in save_model's: the flags are restored once
        wrapper = flat_outputs(model, names, n_positional, constants).eval()
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in named.items()}
        raw = model(*[tensors[n] for n in names[:n_positional]],
                    **{n: tensors[n] for n in names[n_positional:]}, **constants)
        found, dropped = flatten_named(raw)
        outputs = [_to_numpy(t) for _, t in found]
        again = [_to_numpy(t) for t in wrapper(**tensors)]
        _check_usable(outputs, again, [n for n, _ in found])
        if dropped:
            _logger.warning("chimera: outputs that are not tensors are not served: %s", ", ".join(dropped))
        spec, shapes, labels = _dynamic_dims(named, dynamic_shapes)
        export_named = {n: np.concatenate([a, a]) if a.shape[0] == 1 else a for n, a in named.items()}
        export_tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in export_named.items()}
        try:
            program = torch.export.export(wrapper, (), export_tensors, dynamic_shapes=spec)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                               f"{type(exc).__name__}: {first_line[:500]}") from exc
    out_shapes = _output_shapes(program, outputs)
    axis_ranges = _axis_ranges(program, labels)
    signature = Signature(
        inputs=[TensorInfo(n, str(a.dtype), shapes[n]) for n, a in named.items()],
        outputs=[TensorInfo(name, str(a.dtype), shape) for (name, _), a, shape in zip(found, outputs, out_shapes)],
        n_positional=0,  # the reference program takes every input by name
        structure="tensor" if hasattr(raw, "detach") else "dict",
        dynamic_axes={n: {str(k): v for k, v in axes.items() if k} for n, axes in labels.items()
                      if len(axes) > 1},
        axis_ranges=axis_ranges,
    )
    return Captured(program, signature, named, wrapper, outputs, dropped, constants)
