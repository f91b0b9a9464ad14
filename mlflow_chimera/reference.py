"""The reference program: the model captured once with ``torch.export``, saved without pickle.

Every variant is derived from the reference program, and its sha256 is the model's identity
in all provenance. Loading it back is guarded: ``torch.export.load`` falls back to unrestricted
unpickling for some archive entries, so :func:`load_program` first checks the archive's digest
and then validates every pickled entry with torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from mlflow_chimera.manifest import IntegrityError, TensorInfo, sha256_file

# Largest batch the dynamic dimension admits; the parity gate checks up to a smaller "large" batch.
MAX_BATCH = 65536


@dataclass
class Signature:
    """How the model is called: its inputs in order (the first ``n_positional`` go by position)
    and its outputs, flattened (``structure`` is "tensor" when the model returned one tensor,
    served as an array; anything else is served as a dict of named arrays).
    ``dynamic_axes`` names the dynamic axes besides the batch: ``{input: {"1": "sequence"}}``."""

    inputs: list  # [TensorInfo]
    outputs: list  # [TensorInfo]
    n_positional: int
    structure: str  # "tensor" | "tuple" | "list" | "dict"
    dynamic_axes: dict = field(default_factory=dict)
    axis_ranges: dict = field(default_factory=dict)  # {label: [min, max]} the program accepts

    def to_dict(self) -> dict:
        return {
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            "n_positional": self.n_positional,
            "structure": self.structure,
            "dynamic_axes": self.dynamic_axes,
            "axis_ranges": self.axis_ranges,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        def tensor(t):
            return TensorInfo(name=str(t["name"]), dtype=str(t["dtype"]), shape=[int(x) for x in t["shape"]])

        return cls(
            inputs=[tensor(t) for t in d["inputs"]],
            outputs=[tensor(t) for t in d["outputs"]],
            n_positional=int(d["n_positional"]),
            structure=str(d["structure"]),
            dynamic_axes=dict(d.get("dynamic_axes") or {}),
            axis_ranges={str(k): [int(v[0]), int(v[1])] for k, v in (d.get("axis_ranges") or {}).items()},
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


def _is_tensor(value) -> bool:
    """A torch tensor (also a fake one while exporting), without importing torch."""
    return hasattr(value, "detach") and hasattr(value, "dtype") and hasattr(value, "shape")


def flatten_named(outputs, prefix: str = "") -> tuple[list, list]:
    """``([(name, tensor)], [dropped])`` for whatever a model returns.

    Names follow the structure: a bare tensor is ``output``; dict keys (also ``transformers``'
    ``ModelOutput`` fields) keep their name; tuple/list items are ``output_<i>`` at the top and
    ``<parent>.<i>`` below; nested dict keys are ``<parent>.<key>``. Anything that is not a
    tensor (``None``, key/value caches, numbers) is left out and named in ``dropped``.
    """
    if _is_tensor(outputs):
        return [(prefix or "output", outputs)], []
    if isinstance(outputs, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in outputs.items()]
    elif isinstance(outputs, (tuple, list)):
        items = [(f"{prefix}.{i}" if prefix else f"output_{i}", v) for i, v in enumerate(outputs)]
    else:
        return [], ([f"{prefix or 'output'} ({type(outputs).__name__})"] if outputs is not None else [])
    found, dropped = [], []
    for name, value in items:
        sub_found, sub_dropped = flatten_named(value, name)
        found += sub_found
        dropped += sub_dropped
    return found, dropped


def flatten_outputs(outputs) -> tuple[list, list, str]:
    """(arrays, names, structure) for a model's output (see :func:`flatten_named`)."""
    named, _ = flatten_named(outputs)
    structure = "tensor" if _is_tensor(outputs) else (
        "dict" if isinstance(outputs, dict) else type(outputs).__name__ if isinstance(outputs, (tuple, list))
        else "other")
    return [_to_numpy(t) for _, t in named], [n for n, _ in named], structure


def save_program(program, path) -> str:
    import torch

    torch.export.save(program, str(path))
    return sha256_file(path)


# Marker entries torch reads as text ("pt2", "0", "little", an id). A pickle that does
# anything needs a newline, a quote, a parenthesis or a binary opcode, none of which match.
_MARKER = re.compile(rb"[A-Za-z0-9_.\-]{0,64}\s?")
_WEIGHT_CONFIGS = ("model_weights_config.json", "model_constants_config.json")


def _raw_tensor_entries(archive: zipfile.ZipFile, names: list) -> set:
    """Entries the archive's weight configs say hold raw tensor bytes, and that no config
    tells torch to unpickle."""
    raw, pickled = set(), set()
    for name in names:
        if posixpath.basename(name) not in _WEIGHT_CONFIGS:
            continue
        try:
            config = json.loads(archive.read(name)).get("config", {})
            entries = [(posixpath.join(posixpath.dirname(name), e["path_name"]), bool(e.get("use_pickle", False)))
                       for e in config.values()]
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise IntegrityError(f"archive entry {name!r} is not a valid weights config ({exc})") from exc
        for path, use_pickle in entries:
            (pickled if use_pickle else raw).add(path)
    return raw - pickled


def _is_json_document(data: bytes) -> bool:
    """A JSON object or array. Its first byte (``{`` or ``[``) is no pickle opcode, so no
    unpickler can run it whatever the entry is called."""
    if data[:1] not in (b"{", b"["):
        return False
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


# Generated code and shared libraries inside an AOTInductor package: native code, which only a
# trusted variant may bring (see trust.py); never unpickled.
NATIVE_SUFFIXES = (".so", ".cpp", ".h", ".o", ".cubin", ".ptx", ".hsaco", ".fatbin")


def validate_archive(path, what: str = "reference archive", native_code: bool = False) -> None:
    """Refuse a pt2 archive with any entry that could run code when unpickled.

    Every entry is checked, whatever its name: raw tensor bytes (``use_pickle: false`` in the
    archive's weight configs), JSON documents and short text markers are data; every other
    entry must load with torch's ``weights_only`` unpickler, or the archive is refused.
    ``native_code=True`` (AOTInductor packages) also lets through generated code and shared
    libraries, by suffix: those are loaded as native code, never unpickled.
    """
    import torch

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"{what} {path} is not a zip archive ({exc})") from exc
    with archive:
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        raw = _raw_tensor_entries(archive, names)
        for name in names:
            if name in raw or (native_code and name.endswith(NATIVE_SUFFIXES)):
                continue
            data = archive.read(name)
            if _MARKER.fullmatch(data) or _is_json_document(data):
                continue
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as exc:
                raise IntegrityError(
                    f"{what} entry {name!r} is neither data nor loadable with weights_only=True "
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
