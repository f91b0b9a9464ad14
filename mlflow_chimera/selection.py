"""Selection: which variant this host runs, and why each other one was not chosen.

Rules, in order:

1. A variant that did not pass parity is never a candidate, unless the caller forces it by id
   (``model_config={"variant": id}``).
2. A variant whose backend says it cannot run on this host (missing runtime, older runtime than
   it was built with, wrong device or instruction set, …) is rejected with that reason.
3. Accuracy: by default only fp32 variants are candidates — a lossy variant (bf16, fp16,
   int8) changes what the model returns, so it is served only when the caller opts in with
   ``model_config={"precision": "int8"}`` (one precision), ``"fp32,bf16"`` (several),
   ``"any"`` (or ``{"accuracy": "any"}``), or ``{"max_abs_err": 1e-2}`` (any precision whose
   measured parity error is within that bound). ``{"backend": …}`` keeps only that backend's
   variants. :meth:`Decision.explain` says what each opt-in would gain.
4. Candidates with a benchmark measured on *this host class* come first, fastest p50 at batch 1
   first. Timings from other host classes are never compared. Figures closer than twice their
   noise (and at most 5 % apart) are a tie, broken by load cost: a variant that needs no torch
   first, then the faster to load.
5. Candidates without such a measurement follow in the default order: backends in
   :data:`mlflow_chimera.backends.DEFAULT_ORDER` (ONNX Runtime, then the eager reference), fp32
   before lower precisions, default session options before alternatives.

The loader then tries candidates in this order; one that fails its integrity check or fails to
load is skipped with a warning and the next is tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_chimera import backends as backend_registry
from mlflow_chimera.manifest import BUILD_FAILED, FAILED_PARITY, RANK_BATCH, Variant

AUTO = "auto"
_PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8")


@dataclass
class Candidate:
    variant: Variant
    basis: str  # how it was ranked, in words
    p50_ms: float | None = None
    noise: float = 0.0  # relative standard error of p50_ms
    load_cost: tuple = ()  # (needs torch, load seconds): lower loads faster


@dataclass
class OptIn:
    """A lossy variant the default accuracy left out, and what choosing it would gain."""

    variant: Variant
    p50_ms: float
    how: str  # the model_config that opts in


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
    opt_ins: list = field(default_factory=list)  # [OptIn], fastest first

    def gains(self) -> list:
        """One line per faster lossy variant: its speed-up over the pick, its measured error
        and the model_config that would serve it."""
        chosen = next((c for c in self.candidates if self.chosen is not None and c.variant.id == self.chosen.id),
                      self.candidates[0] if self.candidates else None)
        if chosen is None or chosen.p50_ms is None:
            return []
        lines = []
        for o in self.opt_ins:
            if o.p50_ms < chosen.p50_ms:
                err = o.variant.parity.max_abs if o.variant.parity else float("nan")
                lines.append(f"{o.variant.id} ({o.variant.precision}): {chosen.p50_ms / o.p50_ms:.1f}x faster "
                             f"than the pick, max abs err {err:.1g}; opt in with model_config={o.how}")
        return lines

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
        gains = self.gains()
        if gains:
            lines.append("faster with lower accuracy (not chosen unless asked for):")
            lines += [f"  {line}" for line in gains]
        return "\n".join(lines)


def _wanted(value) -> str | None:
    return None if value in (None, "", AUTO) else str(value)


DEFAULT_PRECISIONS = ("fp32",)


def accepted_precisions(value, accuracy=None, max_abs_err=None) -> tuple | None:
    """The precisions a caller accepts: ``None`` for any; fp32 only when nothing is said.
    ``accuracy="any"`` or a ``max_abs_err`` bound (checked per variant) lifts the default."""
    wanted = _wanted(value)
    if _wanted(accuracy) not in (None, "any", "fp32"):
        raise ValueError(f"model_config accuracy {accuracy!r} is not understood; expected 'fp32' (the "
                         f"default) or 'any' (or use 'precision' / 'max_abs_err')")
    if wanted is None:
        if _wanted(accuracy) == "any" or _wanted(max_abs_err) is not None:
            return None
        return DEFAULT_PRECISIONS
    if wanted == "any":
        return None
    names = tuple(p.strip() for p in wanted.replace(";", ",").split(",") if p.strip())
    unknown = [p for p in names if p not in _PRECISION_ORDER]
    if unknown:
        raise ValueError(f"model_config precision {unknown} is not a precision; expected one or more of "
                         f"{', '.join(_PRECISION_ORDER)} (comma-separated), or 'any'")
    return names


def check_config(config: dict) -> None:
    """Raise ``ValueError`` naming a model_config value selection cannot use."""
    accepted_precisions(config.get("precision"), config.get("accuracy"), config.get("max_abs_err"))
    _error_bound(config.get("max_abs_err"))


def rank(variants: list, host, config: dict | None = None, refused: dict | None = None,
         trust: str = "") -> Decision:
    """Filter and order ``variants`` for ``host`` (see the module docstring for the rules).
    ``refused`` are variants already out (bad records, untrusted), with their reasons."""
    config = config or {}
    forced = _wanted(config.get("variant"))
    want_backend = _wanted(config.get("backend"))
    want_precision = accepted_precisions(config.get("precision"), config.get("accuracy"),
                                         config.get("max_abs_err"))
    max_err = _error_bound(config.get("max_abs_err"))
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
    rejected, measured, unmeasured, opt_ins = dict(refused or {}), [], [], []
    for v in variants:
        reason = _rejection(v, host, forced, want_backend, want_precision, max_err)
        bench = v.benchmark_for(host.host_class)
        p50 = bench.p50(RANK_BATCH) if bench else None
        if reason:
            rejected[v.id] = reason
            if reason.startswith(_LOSSY) and p50 is not None and _runs_here(v, host):
                opt_ins.append(OptIn(v, p50, f"{{'precision': '{v.precision}'}}"))
            continue
        if p50 is not None:
            measured.append(Candidate(v, f"p50 {p50:.4g} ms at batch {RANK_BATCH}, measured on this host class",
                                      p50, bench.noise(RANK_BATCH), _load_cost(v)))
        else:
            unmeasured.append(v)
    unmeasured.sort(key=_default_order_key)
    candidates = _break_ties(sorted(measured, key=lambda c: c.p50_ms)) + [
        Candidate(v, f"not measured on this host class; default order #{i}")
        for i, v in enumerate(unmeasured, 1)
    ]
    return Decision(host_class=host.host_class, candidates=candidates, rejected=rejected, forced=forced,
                    trust=trust, opt_ins=sorted(opt_ins, key=lambda o: o.p50_ms))


# Two figures are a tie when they differ by less than this many standard errors — and never
# when they differ by more than MAX_TIE (a noisy measurement must not excuse a slow pick).
TIE_STANDARD_ERRORS = 2.0
MAX_TIE = 0.05


def tie_band(noise_a: float, noise_b: float) -> float:
    """The relative difference under which two figures with these noises are a tie."""
    return min(TIE_STANDARD_ERRORS * max(noise_a, noise_b), MAX_TIE)


def _break_ties(ranked: list) -> list:
    """Fastest first, except that a candidate whose figure is within the measurement noise of
    the fastest remaining one is a tie, and the tie goes to the one cheaper to load."""
    ordered, rest = [], list(ranked)
    while rest:
        head = rest[0]
        tied = [c for c in rest
                if c.p50_ms <= head.p50_ms * (1 + tie_band(head.noise, c.noise))]
        pick = min(tied, key=lambda c: (c.load_cost, c.p50_ms))
        if pick is not head:
            why = "needs no torch" if pick.load_cost[0] < head.load_cost[0] else "loads faster"
            pick.basis += (f"; ties with {head.variant.id} ({head.p50_ms:.4g} ms) within measurement noise, "
                           f"preferred as it {why}")
        ordered.append(pick)
        rest.remove(pick)
    return ordered


def _load_cost(v: Variant) -> tuple:
    try:
        needs_torch = backend_registry.get(v.backend).needs_torch_at_runtime
    except backend_registry.UnknownBackendError:
        needs_torch = True
    return (int(bool(needs_torch)), float(v.provenance.get("load_seconds") or 0.0))


def _runs_here(v: Variant, host) -> bool:
    try:
        return backend_registry.get(v.backend).incompatibility(v, host) is None
    except backend_registry.UnknownBackendError:
        return False


def _error_bound(value) -> float | None:
    if _wanted(value) is None:
        return None
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = -1.0
    if not bound > 0:
        raise ValueError(f"model_config max_abs_err {value!r} is not a positive number; expected e.g. 1e-2")
    return bound


_LOSSY = "lossy: "


def _rejection(v: Variant, host, forced, want_backend, want_precision, max_err=None) -> str | None:
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
            return (f"{_LOSSY}{v.precision} is served only on request "
                    f"(model_config={{'precision': '{v.precision}'}}, 'any', or a 'max_abs_err' bound)")
        return f"model_config asks for precision {','.join(want_precision)!r}"
    if max_err is not None and not forced:
        err = v.parity.max_abs if v.parity is not None else float("nan")
        if not err <= max_err:
            return f"measured max abs err {err:.2g} is above model_config max_abs_err {max_err:g}"
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
