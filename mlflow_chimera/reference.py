"""The reference program: the model captured once with ``torch.export``, saved without pickle.

Every variant is derived from the reference program, and its sha256 is the model's identity
in all provenance. Loading it back is guarded: ``torch.export.load`` falls back to unrestricted
unpickling for some archive entries, so :func:`load_program` first checks the archive's digest
and then validates every pickled entry with torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import inspect
import io
import json
import posixpath
import zipfile
from dataclasses import dataclass

import numpy as np

from mlflow_chimera.manifest import IntegrityError, TensorInfo, sha256_file

# Largest batch the dynamic dimension admits; the parity gate checks up to a smaller "large" batch.
MAX_BATCH = 65536


@dataclass
class Signature:
    """How the model is called: its inputs in order (the first ``n_positional`` go by position)
    and its outputs, flattened in pytree order (``structure`` says how to rebuild them)."""

    inputs: list  # [TensorInfo]
    outputs: list  # [TensorInfo]
    n_positional: int
    structure: str  # "tensor" | "tuple" | "list" | "dict"

    def to_dict(self) -> dict:
        return {
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            "n_positional": self.n_positional,
            "structure": self.structure,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(
            inputs=[TensorInfo(**t) for t in d["inputs"]],
            outputs=[TensorInfo(**t) for t in d["outputs"]],
            n_positional=d["n_positional"],
            structure=d["structure"],
        )

    @property
    def input_names(self) -> list:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list:
        return [t.name for t in self.outputs]

    def split_call(self, named: dict) -> tuple[tuple, dict]:
        """(args, kwargs) for calling the model with inputs given by name."""
        names = self.input_names
        args = tuple(named[n] for n in names[: self.n_positional])
        kwargs = {n: named[n] for n in names[self.n_positional :]}
        return args, kwargs


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def normalize_example(model, input_example) -> tuple[dict, int]:
    """Name the example's tensors after ``model.forward``'s parameters.

    Accepts one array/tensor, a tuple or list of them (positional), or a dict (named).
    Returns ``({name: ndarray}, n_positional)`` in the order the model takes them.
    """
    params = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(input_example, dict):
        unknown = set(input_example) - {p.name for p in params}
        if unknown:
            raise ValueError(
                f"input_example has keys {sorted(unknown)} that {type(model).__name__}.forward "
                f"does not take; its parameters are {[p.name for p in params]}"
            )
        named = {p.name: _to_numpy(input_example[p.name]) for p in params if p.name in input_example}
    else:
        values = list(input_example) if isinstance(input_example, (tuple, list)) else [input_example]
        if len(values) > len(positional):
            raise ValueError(
                f"input_example has {len(values)} tensors but {type(model).__name__}.forward "
                f"takes {len(positional)} positional inputs ({positional})"
            )
        named = {name: _to_numpy(v) for name, v in zip(positional, values)}
    # Inputs go by position up to the first parameter the example leaves out.
    n_positional = 0
    for name in positional:
        if name not in named:
            break
        n_positional += 1
    for name, arr in named.items():
        if arr.ndim == 0:
            raise ValueError(f"input {name!r} is a scalar; chimera needs a batch dimension first")
    batches = {arr.shape[0] for arr in named.values()}
    if len(batches) != 1:
        raise ValueError(f"inputs disagree on the batch size: {({n: a.shape for n, a in named.items()})}")
    return named, n_positional


def flatten_outputs(outputs) -> tuple[list, list, str]:
    """(arrays, names, structure) for a model's output: a tensor, a tuple/list, or a dict."""
    if isinstance(outputs, dict):
        return [_to_numpy(v) for v in outputs.values()], [str(k) for k in outputs], "dict"
    if isinstance(outputs, (tuple, list)):
        kind = "tuple" if isinstance(outputs, tuple) else "list"
        return [_to_numpy(v) for v in outputs], [f"output_{i}" for i in range(len(outputs))], kind
    return [_to_numpy(outputs)], ["output"], "tensor"


def capture(model, input_example) -> tuple[object, Signature, dict]:
    """Export ``model`` with a dynamic batch dimension.

    Returns ``(exported_program, signature, example)``, where ``example`` is the named example
    as numpy arrays. An example of batch 1 is tiled to batch 2 for the export only, because
    torch.export specialises a size-1 dimension to the constant 1.
    """
    import torch

    model.eval()
    named, n_positional = normalize_example(model, input_example)
    export_named = {n: np.concatenate([a, a]) if a.shape[0] == 1 else a for n, a in named.items()}
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in export_named.items()}
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    names = list(named)
    args = tuple(tensors[n] for n in names[:n_positional])
    kwargs = {n: tensors[n] for n in names[n_positional:]}
    dynamic = {n: {0: batch} for n in names}
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)
        eager_out = model(*[torch.from_numpy(named[n]) for n in names[:n_positional]],
                          **{n: torch.from_numpy(named[n]) for n in names[n_positional:]})
    arrays, out_names, structure = flatten_outputs(eager_out)
    signature = Signature(
        inputs=[TensorInfo(n, str(a.dtype), [-1, *a.shape[1:]]) for n, a in named.items()],
        outputs=[TensorInfo(n, str(a.dtype), [-1, *a.shape[1:]]) for n, a in zip(out_names, arrays)],
        n_positional=n_positional,
        structure=structure,
    )
    return program, signature, named


def save_program(program, path) -> str:
    import torch

    torch.export.save(program, str(path))
    return sha256_file(path)


# Archive entries that are never unpickled: JSON, markers, and an AOTInductor package's
# generated code and shared libraries (native code, guarded by the variant's sha256 instead).
_PLAIN_SUFFIXES = (".json", "archive_format", "archive_version", "byteorder", "/.data/version",
                   "serialization_id", ".cpp", ".h", ".so", ".o", ".cubin", ".ptx", ".hsaco")
_WEIGHT_CONFIGS = ("model_weights_config.json", "model_constants_config.json")


def validate_archive(path) -> None:
    """Refuse a pt2 archive with any pickled entry torch's ``weights_only`` loader rejects.

    Raw-bytes tensors (``use_pickle: false`` in the archive's weight configs) and JSON are data;
    every other entry must load with ``torch.load(weights_only=True)``.
    """
    import torch

    with zipfile.ZipFile(path) as archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        raw = set()
        for name in names:
            if posixpath.basename(name) in _WEIGHT_CONFIGS:
                config = json.loads(archive.read(name)).get("config", {})
                folder = posixpath.dirname(name)
                raw |= {posixpath.join(folder, e["path_name"]) for e in config.values()
                        if not e.get("use_pickle", False)}
        for name in names:
            if name in raw or name.endswith(_PLAIN_SUFFIXES):
                continue
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception as exc:
                raise IntegrityError(
                    f"reference archive entry {name!r} is not loadable with weights_only=True "
                    f"({type(exc).__name__}); refusing to unpickle it"
                ) from exc


def load_program(path, expected_sha256: str):
    """Load the reference program after checking its digest and validating its archive."""
    import torch

    actual = sha256_file(path)
    if actual != expected_sha256:
        raise IntegrityError(
            f"reference program {path} has sha256 {actual[:12]}…, expected {expected_sha256[:12]}…"
        )
    validate_archive(path)
    return torch.export.load(str(path))
