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


def check_cases(example_batch: int, dynamic_axes: dict | None = None, large: int | None = None) -> list:
    """The inputs every variant is checked on, as ``[{"label", "batch"}]``: generated inputs at
    batch 1, the example itself, generated inputs at the example's batch and at a larger batch
    (at least 2× the example), and — when the model has dynamic axes besides the batch —
    generated inputs with those axes shorter than the example's."""
    large = large or max(2 * example_batch, 16)
    cases = [{"label": "batch_1", "batch": 1}, {"label": "example", "batch": example_batch},
             {"label": "generated", "batch": example_batch}, {"label": f"batch_{large}", "batch": large}]
    if dynamic_axes:
        cases.append({"label": "shorter_axes", "batch": example_batch})
    return cases


def make_inputs(example: dict, batch: int, seed: int = 0, dynamic_axes: dict | None = None,
                shorter: bool = False) -> dict:
    """Inputs of ``batch`` rows that differ from the example in values, with its dtypes.

    Floating inputs are drawn with the example's mean and spread; integer inputs uniformly
    within the range the example shows, except inputs with at most two distinct values
    (attention masks, segment ids, flags), whose rows are drawn from the example's rows so they
    keep their structure. ``shorter=True`` shrinks every dynamic non-batch axis to half the
    example's size (at least 2): a gate fed one input shape is fooled by a size baked in.
    """
    rng = np.random.default_rng(seed + 7919 * batch + (1 if shorter else 0))
    n = next(iter(example.values())).shape[0]
    rows = rng.integers(0, n, size=batch)
    sizes = {}
    if shorter:
        for name, axes in (dynamic_axes or {}).items():
            for axis, label in axes.items():
                sizes.setdefault(label, max(2, example[name].shape[int(axis)] // 2))
    out = {}
    for name, arr in example.items():
        shape = [batch, *arr.shape[1:]]
        for axis, label in ((dynamic_axes or {}).get(name) or {}).items():
            if label in sizes:
                shape[int(axis)] = sizes[label]
        if np.issubdtype(arr.dtype, np.floating):
            mean, std = float(arr.mean()), float(arr.std()) or 1.0
            value = rng.normal(mean, std, size=shape).astype(arr.dtype)
        elif arr.dtype == np.bool_ or np.unique(arr).size <= 2:
            value = arr[rows][tuple(slice(0, d) for d in shape)]
            if value.shape != tuple(shape):  # an axis longer than the example's: repeat it
                value = np.resize(value, shape)
        else:
            value = rng.integers(int(arr.min()), int(arr.max()) + 1, size=shape).astype(arr.dtype)
        out[name] = np.ascontiguousarray(value)
    return out


def case_inputs(example: dict, case: dict, dynamic_axes: dict | None = None) -> dict:
    """The inputs of one of :func:`check_cases`' cases."""
    if case["label"] == "example":
        return example
    return make_inputs(example, case["batch"], dynamic_axes=dynamic_axes,
                       shorter=case["label"] == "shorter_axes")


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
    """Check ``runner`` on ``cases`` — ``(label, batch, inputs, reference outputs)`` — and stop
    at the first case that fails."""
    checks = []
    for label, batch, inputs, expected in cases:
        try:
            got = runner.run(inputs)
        except Exception as exc:  # noqa: BLE001 - a variant that raises fails parity
            checks.append({"case": label, "batch": batch, "outputs": [],
                           "error": f"{type(exc).__name__}: {exc}"[:500]})
            return Parity(False, tol, criterion, checks,
                          reason=f"{_case_words(label, batch)}: raised {type(exc).__name__}: {str(exc)[:200]}")
        outputs = compare_outputs(expected, got, output_names, tol)
        checks.append({"case": label, "batch": batch, "outputs": outputs})
        failed = [o for o in outputs if not o["passed"]]
        if failed:
            first = failed[0]
            return Parity(False, tol, criterion, checks,
                          reason=f"{_case_words(label, batch)}, output {first['name']!r}: {first.get('reason')}")
    return Parity(True, tol, criterion, checks)


def _case_words(label: str, batch: int) -> str:
    return {"example": f"the input example (batch {batch})",
            "generated": f"generated inputs at batch {batch}",
            "shorter_axes": f"generated inputs with shorter dynamic axes (batch {batch})"}.get(
        label, f"generated inputs at batch {batch}")
