"""Records that describe a chimera model: tensors, variants, parity, benchmarks, provenance.

Everything here is plain data that round-trips through JSON. A model directory looks like::

    MLmodel                      flavor "chimera": a summary of this manifest
    reference/program.pt2        the reference program (torch.export.save)
    reference/check_inputs.npz   example inputs and the reference's outputs for them, used to
    reference/check_outputs.npz  verify a variant when it is loaded
    variants/<id>/variant.json   one Variant record (provenance, parity, benchmarks, digests)
    variants/<id>/...            that variant's files

Trust chain: MLmodel records the sha256 of the reference and of every ``variant.json``; each
``variant.json`` records the sha256 of every file of its variant.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

REFERENCE_DIR = "reference"
REFERENCE_PROGRAM = "reference/program.pt2"
CHECK_INPUTS = "reference/check_inputs.npz"
CHECK_OUTPUTS = "reference/check_outputs.npz"
VARIANTS_DIR = "variants"
VARIANT_FILE = "variant.json"
BENCHMARKS_DIR = "benchmarks"  # <host class>.json: figures stored after logging (host_benchmark.py)
RANK_BATCH = 1  # the batch size selection and the variant table compare variants at

# Variant status values.
READY = "ready"
FAILED_PARITY = "failed_parity"
BUILD_FAILED = "build_failed"


MLMODEL = "MLmodel"


def read_mlmodel(path: str | os.PathLike) -> dict:
    """An MLmodel file (``path`` is the file or the model directory holding it) as a dict.
    Parsed with libyaml where PyYAML has it: the pure-Python parser takes tens of
    milliseconds on a model with many variants, on every load."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / MLMODEL
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}  # noqa: S506 - a safe loader


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_tree(root: str | os.PathLike, exclude: tuple[str, ...] = (VARIANT_FILE,)) -> dict:
    """sha256 of every file under ``root``, keyed by POSIX path relative to it."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


class IntegrityError(Exception):
    """A file's digest does not match the one recorded for it, or a record names a path or id
    that is not allowed."""


# Every name and path a record gives is checked before it is used: a record is data written by
# whoever could write the artifact store or the tracking database (DESIGN §5).
_VARIANT_ID = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PATH_PART = re.compile(r"[A-Za-z0-9_.+-]{1,255}")


def check_variant_id(value) -> str:
    """A variant id: lower-case letters, digits and ``_.+-``, no ``..``; never a path."""
    if not isinstance(value, str) or not _VARIANT_ID.fullmatch(value) or ".." in value:
        raise IntegrityError(f"invalid variant id {str(value)[:80]!r}: expected lower-case letters, digits "
                             "and _.+- (no slashes, no '..')")
    return value


def check_sha256(value, what: str = "digest") -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise IntegrityError(f"invalid {what} {str(value)[:80]!r}: expected 64 lower-case hex digits")
    return value


def check_relative_path(value) -> str:
    """A file path as records give it: relative, POSIX, normalised, every part a plain name."""
    parts = value.split("/") if isinstance(value, str) else [""]
    if (not isinstance(value, str) or posixpath.normpath(value) != value
            or not all(_PATH_PART.fullmatch(p) and p not in (".", "..") for p in parts)):
        raise IntegrityError(f"invalid file path {str(value)[:120]!r} in a record: expected a relative path "
                             "of plain names inside the variant's directory")
    return value


def confined(root: str | os.PathLike, rel: str) -> Path:
    """``root/rel`` after checking that ``rel`` is a plain relative path that resolves (links
    followed) inside ``root``."""
    path = Path(root, check_relative_path(rel))
    real_root = Path(root).resolve()
    if path.exists() and not path.resolve().is_relative_to(real_root):
        raise IntegrityError(f"{rel!r} resolves outside {root}")
    return path


def verify_digests(root: str | os.PathLike, expected: dict) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing or altered (or
    whose path is not a plain path inside ``root``)."""
    for rel, digest in expected.items():
        check_sha256(digest, f"digest of {rel!r}")
        path = confined(root, rel)
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (expected sha256 {digest[:12]}…)")
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(
                f"{path} has sha256 {actual[:12]}…, but {digest[:12]}… was recorded for it"
            )


@dataclass
class TensorInfo:
    """One named input or output. ``shape`` uses -1 for the (dynamic) batch dimension."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list

    def accepts(self, shape) -> bool:
        """Whether an array of ``shape`` fits: same rank, every fixed non-batch axis equal."""
        return len(shape) == len(self.shape) and all(
            want == -1 or got == want for got, want in zip(shape[1:], self.shape[1:]))

    def describe(self) -> str:
        dims = ", ".join(("batch" if i == 0 else "any") if d == -1 else str(d) for i, d in enumerate(self.shape))
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class Parity:
    """Measured error of a variant against the reference."""

    passed: bool
    tolerance: dict  # {"atol": …, "rtol": …}
    criterion: str  # "elementwise atol-or-rtol"; "loose bound (no task metric given)" for int8
    checks: list = field(default_factory=list)  # [{batch, outputs: [{name, max_abs, max_rel, …}]}]
    reason: str | None = None

    @property
    def max_abs(self) -> float:
        vals = [o["max_abs"] for c in self.checks for o in c.get("outputs", [])]
        return max(vals) if vals else float("nan")

    @property
    def max_rel(self) -> float:
        vals = [o["max_rel"] for c in self.checks for o in c.get("outputs", [])]
        return max(vals) if vals else float("nan")


@dataclass
class Benchmark:
    """Latency of a variant on one host class, per batch size (milliseconds)."""

    host_class: str
    latency_ms: dict  # {"1": {"p50": …, "p90": …, "p99": …, "calls": …, "cv": …, "noise": …}, "8": {…}}
    measured_at: str = ""
    tool: str = "log_model"
    threads: dict = field(default_factory=dict)  # thread counts the figures were taken with
    method: str = ""  # "interleaved": timed side by side with the model's other variants

    def noise(self, batch: int | str) -> float:
        """The relative spread of the figure at ``batch`` (0 when not recorded)."""
        entry = self.latency_ms.get(str(batch)) or {}
        return float(entry.get("noise") or 0.0)

    def p50(self, batch: int | str) -> float | None:
        entry = self.latency_ms.get(str(batch))
        return entry["p50"] if entry else None


@dataclass
class Variant:
    """One compiled form of the reference program."""

    id: str
    backend: str
    precision: str
    target: str  # device target: "cpu", "cuda-sm90", …
    status: str = READY
    reason: str | None = None
    options: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # relative path -> sha256
    requirements: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    parity: Parity | None = None
    benchmarks: list = field(default_factory=list)  # [Benchmark]
    # Artifact URI of the directory holding the files, when they are not in the model
    # directory (a logged model keeps payloads in its run's artifacts; see cache.py).
    location: str | None = None

    @property
    def passed_parity(self) -> bool:
        return self.status == READY and self.parity is not None and self.parity.passed

    def content_key(self) -> str:
        """sha256 naming this variant's set of files (paths and digests): its cache key."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def benchmark_for(self, host_class: str) -> Benchmark | None:
        for b in self.benchmarks:
            if b.host_class == host_class:
                return b
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        """A record from JSON. Fields this version does not know (written by a newer chimera)
        are ignored; ids and file paths are checked (see :func:`check_variant_id`)."""
        if not isinstance(d, dict):
            raise IntegrityError(f"a variant record must be a JSON object, not {type(d).__name__}")
        d = _known_fields(cls, d)
        if d.get("parity") is not None:
            d["parity"] = Parity(**_known_fields(Parity, d["parity"]))
        d["benchmarks"] = [Benchmark(**_known_fields(Benchmark, b)) for b in d.get("benchmarks") or []]
        try:
            variant = cls(**d)
        except TypeError as exc:
            raise IntegrityError(f"variant record is missing a field: {exc}") from exc
        check_variant_id(variant.id)
        if not isinstance(variant.files, dict):
            raise IntegrityError(f"variant {variant.id}: 'files' must map paths to sha256 digests")
        for rel, digest in variant.files.items():
            check_relative_path(rel)
            check_sha256(digest, f"digest of {rel!r}")
        return variant

    def save(self, variant_dir: str | os.PathLike) -> str:
        """Write ``variant.json`` and return its sha256."""
        path = Path(variant_dir, VARIANT_FILE)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return sha256_file(path)

    @classmethod
    def load(cls, variant_dir: str | os.PathLike, expected_sha256: str | None = None) -> "Variant":
        path = Path(variant_dir, VARIANT_FILE)
        if expected_sha256 is not None:
            verify_digests(variant_dir, {VARIANT_FILE: expected_sha256})
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _known_fields(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise IntegrityError(f"expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def variant_dir(model_dir: str | os.PathLike, variant_id: str) -> Path:
    return Path(model_dir, VARIANTS_DIR, check_variant_id(variant_id))
