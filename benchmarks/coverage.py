"""Coverage of Hugging Face architectures as users hand them over, and the table in the docs.

    python -m benchmarks.coverage                      # every architecture, ONNX Runtime + eager
    python -m benchmarks.coverage --all-backends bert  # one architecture, every backend here

For each architecture of ``tests/hf_models.py`` (small configs, random weights, no download):
log the model exactly as ``transformers`` gives it (no wrapper) to a fresh sqlite store with
``mlflow.chimera.log_model(..., registered_model_name=...)``, load ``models:/NAME/1`` in a
fresh Python process, serve inputs it has never seen (another batch size, other values) and
compare with the eager model. Writes ``docs/COVERAGE.md`` (and prints it).

Columns: variants ready (of built) · the default pick on this host · its p50 speed-up over the
eager reference at batch 1 (log-time figures, same run) · served max abs error on fresh inputs
and the tolerance of the precision served.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "COVERAGE.md"
FAST_BACKENDS = ["onnxruntime", "eager"]

_SERVE = r"""
import json, sys
import numpy as np
import mlflow
uri, inputs, outputs = sys.argv[1:4]
model = mlflow.pyfunc.load_model(uri)
with np.load(inputs, allow_pickle=False) as data:
    x = {k: data[k] for k in data.files}
got = model.predict(x if len(x) > 1 else next(iter(x.values())))  # one input: an array, as MLflow's schema wants
got = got if isinstance(got, dict) else {"output": got}
np.savez(outputs, **got)
raw = model.get_raw_model()
print(json.dumps({"variant": raw.variant.id, "precision": raw.variant.precision,
                  "torch_imported": "torch" in sys.modules}))
"""


def _catalogue():
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_models

    return hf_models.ARCHITECTURES


def eager_outputs(model, inputs: dict) -> dict:
    """The eager model's outputs on ``inputs``, flattened and named as chimera serves them."""
    import torch

    from mlflow_chimera.reference import flatten_named

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **_switches(model))
    return {name: t.numpy() for name, t in flatten_named(out)[0]}


def _switches(model) -> dict:
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def cover(name: str, spec, backends=None, tracking_uri: str | None = None, workdir: str | None = None) -> dict:
    """Log, serve in a fresh process and compare one architecture; returns its table row. The
    caller's tracking URI and experiment are put back afterwards."""
    import mlflow
    from mlflow.tracking.fluent import _get_experiment_id

    previous_uri, previous_experiment = mlflow.get_tracking_uri(), _get_experiment_id()
    workdir = workdir or tempfile.mkdtemp(prefix=f"chimera-coverage-{name}-")
    tracking_uri = tracking_uri or f"sqlite:///{Path(workdir, 'mlflow.db')}"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        location = Path(workdir, "artifacts").as_uri()
        if mlflow.get_experiment_by_name("chimera-coverage") is None:
            mlflow.create_experiment("chimera-coverage", artifact_location=location)
        mlflow.set_experiment("chimera-coverage")
        return _cover(name, spec, backends, tracking_uri, workdir)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_experiment is not None:
            mlflow.set_experiment(experiment_id=previous_experiment)


def _cover(name: str, spec, backends, tracking_uri: str, workdir: str) -> dict:
    import mlflow

    import mlflow_chimera  # noqa: F401  (registers mlflow.chimera)
    from mlflow_chimera.compile.parity import tolerance_for

    model = spec.build()
    example = spec.example(batch=2, seed=0)
    started = time.perf_counter()
    info = mlflow.chimera.log_model(model, name=name, input_example=example, registered_model_name=name,
                                    backends=backends or None)
    log_seconds = time.perf_counter() - started
    variants = info.flavors["chimera"]["variants"]
    fresh = spec.example(batch=3, seed=1)
    inputs, outputs = Path(workdir, f"{name}-in.npz"), Path(workdir, f"{name}-out.npz")
    np.savez(inputs, **fresh)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    proc = subprocess.run([sys.executable, "-c", _SERVE, f"models:/{name}/1", str(inputs), str(outputs)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: serving in a fresh process failed:\n{proc.stderr[-3000:]}")
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = eager_outputs(model, fresh)
    with np.load(outputs, allow_pickle=False) as data:
        got = {k: data[k] for k in data.files}
    if list(got) == ["output"] and len(expected) == 1:
        got = {next(iter(expected)): got["output"]}
    errors = {k: float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64)))) for k, v in expected.items()}
    tol = tolerance_for(served["precision"])
    within = all(np.allclose(got[k], v, atol=tol["atol"], rtol=tol["rtol"]) for k, v in expected.items())
    pick = variants[served["variant"]]
    eager = variants.get("eager-fp32-cpu", {})
    speedup = None
    if pick.get("p50_ms") and eager.get("p50_ms"):
        speedup = eager["p50_ms"]["1"] / pick["p50_ms"]["1"]
    return {
        "architecture": name,
        "family": spec.family,
        "ready": sorted(v for v, e in variants.items() if e["status"] == "ready"),
        "built": sorted(variants),
        "ready_fp32_besides_eager": sorted(v for v, e in variants.items() if e["status"] == "ready"
                                           and e["precision"] == "fp32" and e["backend"] != "eager"),
        "failed": {v: e.get("reason", "")[:160] for v, e in variants.items() if e["status"] != "ready"},
        "pick": served["variant"],
        "pick_precision": served["precision"],
        "speedup_over_eager": speedup,
        "served_max_abs_err": max(errors.values()),
        "served_output_names": sorted(got),
        "expected_output_names": sorted(expected),
        "tolerance": tol,
        "within_tolerance": within,
        "log_seconds": round(log_seconds, 1),
    }


def table(rows: list) -> str:
    lines = ["| architecture | family | variants ready | default pick | speed-up over eager (p50, batch 1) "
             "| served max abs error (tolerance) |", "|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup_over_eager']:.1f}×" if r.get("speedup_over_eager") else "–"
        lines.append(f"| {r['architecture']} | {r['family']} | {len(r['ready'])}/{len(r['built'])} "
                     f"| {r['pick']} | {speed} | {r['served_max_abs_err']:.1e} ({r['tolerance']['atol']:g}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures (default: all)")
    parser.add_argument("--all-backends", action="store_true", help="every backend this host can build")
    parser.add_argument("--output", default=str(DOC))
    parser.add_argument("--rows", help="render the table from rows a test run wrote (JSON lines; the test "
                                       "suite writes them where CHIMERA_COVERAGE_ROWS says) instead of running")
    args = parser.parse_args(argv)
    if args.rows:
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
        order = list(_catalogue())
        rows.sort(key=lambda r: order.index(r["architecture"]) if r["architecture"] in order else len(order))
        return _write(rows, sum(r["log_seconds"] for r in rows), args.output, args.all_backends,
                      source="rows written by the test suite's run of the same checks")
    os.environ.setdefault("CHIMERA_BENCH_MAX_SECONDS", "0.3")
    catalogue = _catalogue()
    names = args.names or list(catalogue)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="chimera-coverage-") as tmp:
        for name in names:
            print(f"covering {name} …", file=sys.stderr, flush=True)
            rows.append(cover(name, catalogue[name], None if args.all_backends else FAST_BACKENDS,
                              workdir=tmp, tracking_uri=f"sqlite:///{Path(tmp, 'mlflow.db')}"))
    return _write(rows, time.perf_counter() - started, args.output, args.all_backends, source="this run")


def _write(rows: list, elapsed: float, output: str, all_backends: bool, source: str) -> int:
    text = (f"# Coverage: Hugging Face models as users hand them over\n\n"
            f"Regenerate with `python -m benchmarks.coverage`"
            f"{' --all-backends' if all_backends else ''} ({len(rows)} architectures, "
            f"{elapsed / 60:.1f} min of logging on this host, {source}; backends: "
            f"{'all this host can build' if all_backends else ', '.join(FAST_BACKENDS)}). "
            "Each model is built from a small config with random weights, logged exactly as "
            "`transformers` returns it, loaded from `models:/NAME/1` in a fresh process and served "
            "inputs it has not seen (batch 3, other values); the error is against the eager model. "
            "Speed-ups are the log-time p50s of these tiny models (hidden size 32), where eager "
            "torch's per-call overhead dominates: they show that a compiled variant is picked, not "
            "what a full-size model gains (see BENCHMARKS.md).\n\n"
            + table(rows) + "\n")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    print(text)
    Path(output).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
