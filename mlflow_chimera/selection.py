"""Selection: which variant this host runs, and why each other one was not chosen.

Rules, in order:

1. A variant that did not pass parity is never a candidate, unless the caller forces it by id
   (``model_config={"variant": id}``).
2. A variant whose backend says it cannot run on this host (missing runtime, older runtime than
   it was built with, wrong device or instruction set, …) is rejected with that reason.
3. Accuracy: by default only fp32 variants are candidates — a lossy variant (bf16, fp16,
   int8) changes what the model returns, so it is served only when the caller opts in with
   ``model_config={"precision": "int8"}`` (one precision), ``"fp32,bf16"`` (several) or
   ``"any"``. ``{"backend": …}`` keeps only that backend's variants.
4. Candidates with a benchmark measured on *this host class* come first, fastest p50 at batch 1
   first. Timings from other host classes are never compared.
5. Candidates without such a measurement follow in the default order: backends in
   :data:`mlflow_chimera.backends.DEFAULT_ORDER` (ONNX Runtime, then the eager reference), fp32
   before lower precisions, default session options before alternatives.

The loader then tries candidates in this order; one that fails its integrity check or fails to
load is skipped with a warning and the next is tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_chimera import backends as backend_registry
from mlflow_chimera.manifest import BUILD_FAILED, FAILED_PARITY, Variant

RANK_BATCH = 1
AUTO = "auto"
_PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8")


@dataclass
class Candidate:
    variant: Variant
    basis: str  # how it was ranked, in words
    p50_ms: float | None = None


@dataclass
class Decision:
    """The ranking for one host, and what happened when loading it."""

    host_class: str
    candidates: list
    rejected: dict  # variant id -> reason
    forced: str | None = None
    trust: str = ""  # how the model's records are trusted, in words
    attempts: list = field(default_factory=list)  # [(variant id, error)] that failed to load
    chosen: Variant | None = None

    def explain(self) -> str:
        lines = [f"host class: {self.host_class}"]
        if self.trust:
            lines.append(f"trust: {self.trust}")
        if self.chosen is not None:
            how = "forced by model_config" if self.forced else "fastest valid variant here"
            basis = next((c.basis for c in self.candidates if c.variant.id == self.chosen.id), "")
            lines.append(f"chosen: {self.chosen.id} ({how}; {basis})")
        lines.append("ranking:")
        for i, c in enumerate(self.candidates, 1):
            mark = " <- chosen" if self.chosen is not None and c.variant.id == self.chosen.id else ""
            lines.append(f"  {i}. {c.variant.id}: {c.basis}{mark}")
        for vid, error in self.attempts:
            lines.append(f"  skipped {vid}: failed to load: {error}")
        if self.rejected:
            lines.append("not candidates:")
            lines += [f"  {vid}: {reason}" for vid, reason in self.rejected.items()]
        return "\n".join(lines)


def _wanted(value) -> str | None:
    return None if value in (None, "", AUTO) else str(value)


DEFAULT_PRECISIONS = ("fp32",)


def accepted_precisions(value) -> tuple | None:
    """The precisions a caller accepts: ``None`` for any; fp32 only when nothing is said."""
    wanted = _wanted(value)
    if wanted is None:
        return DEFAULT_PRECISIONS
    if wanted == "any":
        return None
    names = tuple(p.strip() for p in wanted.replace(";", ",").split(",") if p.strip())
    unknown = [p for p in names if p not in _PRECISION_ORDER]
    if unknown:
        raise ValueError(f"model_config precision {unknown} is not a precision; expected one or more of "
                         f"{', '.join(_PRECISION_ORDER)} (comma-separated), or 'any'")
    return names


def rank(variants: list, host, config: dict | None = None, refused: dict | None = None,
         trust: str = "") -> Decision:
    """Filter and order ``variants`` for ``host`` (see the module docstring for the rules).
    ``refused`` are variants already out (bad records, untrusted), with their reasons."""
    config = config or {}
    forced = _wanted(config.get("variant"))
    want_backend = _wanted(config.get("backend"))
    want_precision = accepted_precisions(config.get("precision"))
    if forced and forced in (refused or {}):
        raise ValueError(f"model_config variant {forced!r} cannot be loaded: {refused[forced]}")
    if forced and forced not in {v.id for v in variants}:
        raise ValueError(
            f"model_config variant {forced!r} is not in this model; its variants are "
            f"{sorted(v.id for v in variants)}"
        )
    if want_backend and want_backend not in {v.backend for v in variants}:
        raise ValueError(
            f"model_config backend {want_backend!r} has no variant in this model; its backends "
            f"are {sorted({v.backend for v in variants})}"
        )
    rejected, measured, unmeasured = dict(refused or {}), [], []
    for v in variants:
        reason = _rejection(v, host, forced, want_backend, want_precision)
        if reason:
            rejected[v.id] = reason
            continue
        bench = v.benchmark_for(host.host_class)
        p50 = bench.p50(RANK_BATCH) if bench else None
        if p50 is not None:
            measured.append(Candidate(v, f"p50 {p50:.4g} ms at batch {RANK_BATCH}, measured on this host class", p50))
        else:
            unmeasured.append(v)
    measured.sort(key=lambda c: c.p50_ms)
    unmeasured.sort(key=_default_order_key)
    candidates = measured + [
        Candidate(v, f"not measured on this host class; default order #{i}")
        for i, v in enumerate(unmeasured, 1)
    ]
    return Decision(host_class=host.host_class, candidates=candidates, rejected=rejected, forced=forced,
                    trust=trust)


def _rejection(v: Variant, host, forced, want_backend, want_precision) -> str | None:
    if forced and v.id != forced:
        return f"model_config forces variant {forced!r}"
    if v.status == BUILD_FAILED:
        return f"build failed: {v.reason}"
    if v.status == FAILED_PARITY and not forced:
        return f"failed parity: {v.reason}"
    if want_backend and v.backend != want_backend:
        return f"model_config asks for backend {want_backend!r}"
    if want_precision is not None and v.precision not in want_precision and not forced:
        if want_precision == DEFAULT_PRECISIONS:
            return (f"{v.precision} is lossy; served only on request "
                    f"(model_config={{'precision': '{v.precision}'}} or 'any')")
        return f"model_config asks for precision {','.join(want_precision)!r}"
    try:
        backend = backend_registry.get(v.backend)
    except backend_registry.UnknownBackendError as exc:
        return str(exc)
    return backend.incompatibility(v, host)


def _default_order_key(v: Variant) -> tuple:
    order = backend_registry.DEFAULT_ORDER
    backend_rank = order.index(v.backend) if v.backend in order else len(order)
    precision_rank = _PRECISION_ORDER.index(v.precision) if v.precision in _PRECISION_ORDER else 99
    return (backend_rank, precision_rank, len(v.id), v.id)
