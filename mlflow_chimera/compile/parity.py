"""The parity gate: a variant's outputs against the reference's, per output, at several batches.

An element passes if it meets either the absolute or the relative tolerance; NaN or Inf in a
variant's output always fails, as does a wrong shape. Defaults follow DESIGN §6 and can be
overridden per call with ``tolerances={"fp32": {"atol": …, "rtol": …}, …}``.
"""

from __future__ import annotations

import numpy as np

from mlflow_chimera.manifest import Parity

DEFAULT_TOLERANCES = {
    "fp32": {"atol": 1e-4, "rtol": 1e-3},
    "fp16": {"atol": 1e-2, "rtol": 1e-2},
    "bf16": {"atol": 1e-2, "rtol": 1e-2},
    # No task-level metric is given to log_model, so int8 is held to a loose bound and its
    # measured error is recorded (and shown) — never passed silently.
    "int8": {"atol": 1e-1, "rtol": 1e-1},
}
_CRITERIA = {
    "int8": "loose bound: |err| <= atol or |err| <= rtol*|ref| per element (no task metric given)",
}
_DEFAULT_CRITERION = "|err| <= atol or |err| <= rtol*|ref| per element; NaN/Inf fail"


def tolerance_for(precision: str, overrides: dict | None = None) -> dict:
    tol = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"]))
    tol.update((overrides or {}).get(precision, {}))
    return tol


def check_batches(example_batch: int, large: int | None = None) -> list:
    """Batch sizes to check: 1, the example's, and a larger one (at least 2× the example)."""
    large = large or max(2 * example_batch, 16)
    return sorted({1, example_batch, large})


def make_inputs(example: dict, batch: int, seed: int = 0) -> dict:
    """Inputs of ``batch`` rows, like the example but not copies of it (except at its own batch).

    Rows are drawn from the example's rows; floating inputs get noise at the example's scale,
    so a variant that mixes up rows or batches cannot pass by accident.
    """
    n = next(iter(example.values())).shape[0]
    if batch == n:
        return example
    rng = np.random.default_rng(seed + batch)
    rows = rng.integers(0, n, size=batch)
    out = {}
    for name, arr in example.items():
        picked = arr[rows]
        if np.issubdtype(arr.dtype, np.floating):
            scale = float(np.std(arr)) or 1.0
            picked = picked + rng.normal(0.0, 0.1 * scale, size=picked.shape).astype(arr.dtype)
        out[name] = np.ascontiguousarray(picked)
    return out


def compare_outputs(reference: list, candidate: list, names: list, tol: dict) -> list:
    """Per-output error records; each says whether that output passed and, if not, why."""
    results = []
    for name, ref, got in zip(names, reference, candidate):
        got = np.asarray(got)
        record = {"name": name, "max_abs": float("nan"), "max_rel": float("nan"), "passed": False}
        if got.shape != ref.shape:
            record["reason"] = f"shape {list(got.shape)} != reference {list(ref.shape)}"
        elif not np.all(np.isfinite(got)):
            bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
            record["reason"] = f"{bad} NaN/Inf value(s)"
        else:
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            err = np.abs(got64 - ref64)
            rel = err / np.maximum(np.abs(ref64), np.finfo(np.float64).tiny)
            ok = (err <= tol["atol"]) | (err <= tol["rtol"] * np.abs(ref64))
            record["max_abs"] = float(err.max()) if err.size else 0.0
            record["max_rel"] = float(rel.max()) if rel.size else 0.0
            record["passed"] = bool(ok.all())
            if not record["passed"]:
                record["reason"] = (f"{int(ok.size - ok.sum())} element(s) outside atol={tol['atol']:g} "
                                    f"rtol={tol['rtol']:g} (max abs {record['max_abs']:.3g})")
        if len(reference) != len(candidate):
            record.update(passed=False, reason=f"{len(candidate)} outputs, expected {len(reference)}")
        results.append(record)
    return results


def criterion_for(precision: str) -> str:
    return _CRITERIA.get(precision, _DEFAULT_CRITERION)


def run_parity(runner, cases, output_names: list, tol: dict, criterion: str) -> Parity:
    """Check ``runner`` on ``cases`` — ``(batch, inputs, reference outputs)`` — and stop at the
    first batch that fails."""
    checks = []
    for batch, inputs, expected in cases:
        try:
            got = runner.run(inputs)
        except Exception as exc:  # noqa: BLE001 - a variant that raises fails parity
            checks.append({"batch": batch, "outputs": [], "error": f"{type(exc).__name__}: {exc}"[:500]})
            return Parity(False, tol, criterion, checks,
                          reason=f"batch {batch}: raised {type(exc).__name__}: {str(exc)[:200]}")
        outputs = compare_outputs(expected, got, output_names, tol)
        checks.append({"batch": batch, "outputs": outputs})
        failed = [o for o in outputs if not o["passed"]]
        if failed:
            first = failed[0]
            return Parity(False, tol, criterion, checks,
                          reason=f"batch {batch}, output {first['name']!r}: {first.get('reason')}")
    return Parity(True, tol, criterion, checks)
