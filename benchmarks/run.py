"""The benchmark suite's one entry point: ``mlflow.chimera`` against ``mlflow.pytorch`` and
``mlflow.onnx``, side by side in one run, on one temporary tracking store.

For every model of the set (``benchmarks/models.py``: MLP, CNN, transformer encoder, a small
random-weight ``transformers`` BERT) it logs and registers the model three ways
(``benchmarks/flavors.py``), then measures, interleaving the contenders in the same process
wherever it can:

1. pyfunc ``predict`` latency at batch 1 and 32 (median, p90), the ratio against
   ``mlflow.pytorch``, chimera's pyfunc overhead over its own raw runner, and selection regret
   (the chosen variant's raw latency over the fastest parity-passed variant's) —
   ``benchmarks/latency.py``;
2. cold start in fresh processes by ``models:/`` URI (spawn → first prediction, median of
   several) and peak RSS — ``benchmarks/coldstart.py``;
3. served throughput and p50/p99 latency with ``mlflow models serve`` (one worker each) under
   a bounded closed-loop load on 127.0.0.1 — ``benchmarks/serving.py``.

It writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/out/``,
not tracked). ``--update-docs`` also rewrites ``BENCHMARKS.md`` and the README's
"## Performance" section from the result (``--docs-from JSON`` does only that, from a
recorded result). The recorded run lives in ``benchmarks/results/``.

Usage (from the repository root)::

    python -m benchmarks.run --quick                 # smoke run: ~2.7 min on 2 quiet cores, ~4 busy
    python -m benchmarks.run                          # full run: ~14 min on 2 quiet cores, ~30 busy
    python -m benchmarks.run --out benchmarks/results --update-docs   # record + regenerate docs
    python -m benchmarks.run --docs-from benchmarks/results/results.json
    python -m benchmarks.run --models cnn --skip serve

Timings on a shared host are noisy: every phase records the CPU time other processes used
while it ran (``background_cpu_cores``) and the Markdown flags phases above 0.25 cores. Ratios
taken in the same rounds are what to compare; absolute times drift between runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out"
SCHEMA_VERSION = 1
PHASES = ("latency", "cold_start", "serving", "spark")

PRESETS = {
    "quick": {
        "models": ["mlp", "cnn", "transformer", "bert"],
        "batches": [1, 32],
        "raw_batches": [1],
        "timing": {"min_rounds": 2, "max_rounds": 8, "budget_s": 2.5, "block_s": 0.02, "settle_s": 0.01,
                   "warmup_rounds": 0, "max_calls": 50},
        "overhead_timing": {"min_rounds": 3, "max_rounds": 6, "budget_s": 0.4, "block_s": 0.005,
                            "settle_s": 0.0, "warmup_rounds": 1, "max_calls": 200},
        "chimera_benchmark": {"max_seconds": 0.15},
        "quiet": {"max_wait_s": 0, "threshold_cores": 0.25, "retries": 0, "total_wait_s": 0},
        # Only the backends that build in seconds (AOTInductor and torch.compile builds take
        # 10-40 s per model on 2 cores); --all-backends builds every one, as the full run does.
        "chimera_backends": ["onnxruntime", "eager"],
        "cold_start": {"models": ["mlp"], "rounds": 1, "warmup": False},
        "serving": {"models": ["mlp"], "concurrency": [1, 4], "seconds_per_level": 0.6, "rounds": 1,
                    "max_requests": 2000, "warmup_requests": 10},
        "spark": {"models": [], "rows": 256, "rounds": 1},  # a JVM start is too slow for the smoke run
    },
    "full": {
        "models": ["mlp", "cnn", "transformer", "bert"],
        "batches": [1, 32],
        # Selection ranks by batch 1, so regret is measured there (raw runners at 32 as well would
        # add minutes on 2 cores).
        "raw_batches": [1],
        "timing": {"min_rounds": 6, "max_rounds": 40, "budget_s": 12.0, "block_s": 0.05, "settle_s": 0.02,
                   "warmup_rounds": 1, "max_calls": 100},
        "overhead_timing": {"min_rounds": 10, "max_rounds": 40, "budget_s": 3.0, "block_s": 0.01,
                            "settle_s": 0.0, "warmup_rounds": 2, "max_calls": 500},
        "chimera_benchmark": None,  # chimera's defaults, as a user gets them
        # On a shared host: before each timed phase wait up to max_wait_s for other processes to
        # use < threshold_cores; re-time a latency phase that ran busier than that (retries).
        "quiet": {"max_wait_s": 20, "threshold_cores": 0.25, "retries": 1, "total_wait_s": 180},
        "chimera_backends": None,  # every backend this host can build
        "cold_start": {"models": ["mlp", "cnn", "transformer", "bert"], "rounds": 3, "warmup": True},
        "serving": {"models": ["mlp", "cnn", "transformer", "bert"], "concurrency": [1, 8, 32],
                    "seconds_per_level": 1.5, "rounds": 3, "max_requests": 20000, "warmup_requests": 50},
        # mlflow.pyfunc.spark_udf on a local[2] Spark, chimera against mlflow.pytorch (issue #12)
        "spark": {"models": ["cnn"], "rows": 2048, "rounds": 3},
    },
}

# Targets reported against (never asserted): see README "Performance".
TARGETS = {
    "batch1_fp32_speedup_vs_pytorch": {"cnn": 5.0, "mlp": 2.0, "transformer": 2.0},
    "selection_regret_max": 1.05,
    # served throughput at 8 clients, dynamic batching on / off, with p99 no worse (issue #12)
    "served_batching_speedup_c8": {"transformer": 3.0},
    "pyfunc_overhead_us_max": 5.0,
    "cold_start_minus_onnx_s_max": 0.15,
}


class _Progress:
    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, only the chimera backends that "
                                                        "build in seconds, cold start and serving on the MLP only "
                                                        "(about 3 minutes on 2 quiet cores)")
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn", "transformer", "bert"),
                   help="models to run (default: all four)")
    p.add_argument("--skip", nargs="+", choices=("cold_start", "serving", "spark", "cold", "serve"), default=[],
                   help="phases to leave out")
    p.add_argument("--all-backends", action="store_true",
                   help="quick mode: build every chimera backend this host can (the full run always does)")
    p.add_argument("--no-wait", action="store_true",
                   help="do not wait for a quiet host before timed phases, nor re-time busy ones")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--update-docs", action="store_true",
                   help="also rewrite BENCHMARKS.md and the README's Performance section from the result")
    p.add_argument("--docs-from", type=Path, metavar="JSON",
                   help="only regenerate BENCHMARKS.md and the README section from a recorded result")
    p.add_argument("-v", "--verbose", action="store_true", help="keep MLflow's and the exporters' output")
    args = p.parse_args(argv)
    args.skip = {{"cold": "cold_start", "serve": "serving"}.get(s, s) for s in args.skip}
    return args


def _config(args) -> dict:
    mode = "quick" if args.quick else "full"
    cfg = json.loads(json.dumps(PRESETS[mode]))
    cfg["mode"] = mode
    if args.models:
        cfg["models"] = list(dict.fromkeys(args.models))
        for phase in ("cold_start", "serving", "spark"):
            wanted = [m for m in cfg[phase]["models"] if m in cfg["models"]]
            cfg[phase]["models"] = wanted or ([] if phase == "spark" else cfg["models"][:1])
    if args.no_wait:
        cfg["quiet"].update(max_wait_s=0, retries=0, total_wait_s=0)
    if args.all_backends:
        cfg["chimera_backends"] = None
    for phase in args.skip:
        cfg[phase]["models"] = []
    return cfg


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}", "traceback": traceback.format_exc()[-4000:]}


def run(args) -> dict:
    from benchmarks.common import QUIET_ENV

    os.environ.update(QUIET_ENV)  # before MLflow is imported: no telemetry, no progress bars
    progress = _Progress()
    cfg = _config(args)

    import mlflow  # noqa: F401  (imported before quiet(): importing it sets up its loggers)
    import torch

    from benchmarks import coldstart, flavors, latency, serving, spark
    from benchmarks import models as model_zoo
    from benchmarks.common import WAIT_BUDGET, captured_output, host_info, loadavg, quiet, wait_for_quiet
    from mlflow_chimera import backends as chimera_backends

    if not args.verbose:
        quiet()
    WAIT_BUDGET["left_s"] = cfg["quiet"]["total_wait_s"]
    result = {
        "benchmark": "chimera-vs-mlflow-flavors",
        "schema_version": SCHEMA_VERSION,
        "mode": cfg["mode"],
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "config": cfg,
        "targets": TARGETS,
        "host": host_info(),
        "source": _source(),
        "tracking_store": "sqlite:///<tmp>/mlflow.db, local artifacts (one store for every flavor)",
        "models": {},
        "errors": [],
    }

    def failed(model: str, phase: str, exc: BaseException) -> dict:
        err = _error(exc)
        result["errors"].append({"model": model, "phase": phase, "error": err["error"]})
        progress(f"{model}: {phase} FAILED: {err['error'].splitlines()[0]}")
        return err

    with tempfile.TemporaryDirectory(prefix="chimera-bench-") as tmp:
        tmp = Path(tmp)
        tracking_uri = flavors.setup_tracking(tmp)
        flavors.LOAD_ROOT = str(tmp / "loads")
        os.makedirs(flavors.LOAD_ROOT)
        specs, logged = {}, {}

        # 1. build and log every model three ways
        for name in cfg["models"]:
            entry = result["models"][name] = {}
            try:
                progress(f"{name}: building and logging (chimera, pytorch, onnx)")
                spec = specs[name] = model_zoo.build(name)
                entry.update({"description": spec.description, "input": {
                    "shape": [-1, *spec.input_shape], "dtype": spec.input_dtype,
                    "example_batch": model_zoo.EXAMPLE_BATCH}, "notes": spec.notes})
                with captured_output(not args.verbose):
                    backends = cfg["chimera_backends"]
                    if backends:  # only those this version of chimera knows
                        backends = [b for b in backends if b in chimera_backends.names()] or None
                    logged[name] = flavors.log_all(spec, f"bench-{name}", cfg["chimera_benchmark"], backends)
                entry["logged"] = logged[name]
                progress(f"{name}: logged in " + ", ".join(
                    f"{f} {v['log_seconds']} s" for f, v in logged[name].items()))
            except Exception as exc:  # noqa: BLE001 - record it, carry on with the other models
                entry["logged"] = failed(name, "log", exc)

        # 2. in-process latency, overhead and selection regret
        for name in cfg["models"]:
            if name not in logged:
                continue
            try:
                progress(f"{name}: pyfunc latency, overhead and selection regret")
                with captured_output(not args.verbose):
                    loaded = latency.load_contenders(logged[name])
                result["models"][name]["latency"] = latency.measure_model(
                    specs[name], loaded, batches=cfg["batches"], timing=cfg["timing"],
                    raw_batches=cfg["raw_batches"], overhead_timing=cfg["overhead_timing"],
                    quiet=cfg["quiet"])
                lat = result["models"][name]["latency"]["batches"]
                progress(f"{name}: batch 1 ratio vs pytorch: " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in lat["1"].get("ratio_vs_pytorch", {}).items()))
            except Exception as exc:  # noqa: BLE001
                result["models"][name]["latency"] = failed(name, "latency", exc)
            finally:
                loaded = None
                gc.collect()

        # 3. cold start in fresh processes
        for name in cfg["cold_start"]["models"]:
            if name not in logged:
                continue
            try:
                progress(f"{name}: cold start ({cfg['cold_start']['rounds']} rounds)")
                wait_for_quiet(cfg["quiet"]["max_wait_s"], cfg["quiet"]["threshold_cores"])
                result["models"][name]["cold_start"] = coldstart.measure(
                    specs[name], logged[name], _extra_chimera_loads(result["models"][name].get("latency")),
                    tracking_uri, tmp / "coldstart",
                    rounds=cfg["cold_start"]["rounds"], warmup=cfg["cold_start"]["warmup"],
                    # model-independent floors (bare interpreter, import mlflow): with the first model only
                    model_independent_floors=name == cfg["cold_start"]["models"][0])
            except Exception as exc:  # noqa: BLE001
                result["models"][name]["cold_start"] = failed(name, "cold_start", exc)

        # 4. mlflow models serve
        for name in cfg["serving"]["models"]:
            if name not in logged:
                continue
            try:
                progress(f"{name}: mlflow models serve (closed loop, c={cfg['serving']['concurrency']})")
                wait_for_quiet(cfg["quiet"]["max_wait_s"], cfg["quiet"]["threshold_cores"])
                spec = specs[name]

                def expected(x, spec=spec):
                    with torch.inference_mode():
                        return spec.module(torch.from_numpy(x)).numpy().astype("float64")

                opts = {k: v for k, v in cfg["serving"].items() if k != "models"}
                result["models"][name]["serving"] = serving.measure(spec, logged[name], tracking_uri,
                                                                    expected_fn=expected, **opts)
            except Exception as exc:  # noqa: BLE001
                result["models"][name]["serving"] = failed(name, "serving", exc)

        # 5. batch scoring on Spark
        for name in cfg["spark"]["models"]:
            if name not in logged:
                continue
            try:
                progress(f"{name}: spark_udf on local[2] ({cfg['spark']['rows']} rows)")
                wait_for_quiet(cfg["quiet"]["max_wait_s"], cfg["quiet"]["threshold_cores"])
                result["models"][name]["spark"] = spark.measure(
                    specs[name], logged[name], tracking_uri, rows=cfg["spark"]["rows"],
                    rounds=cfg["spark"]["rounds"], workdir=tmp / "spark" / name)
            except Exception as exc:  # noqa: BLE001
                result["models"][name]["spark"] = failed(name, "spark", exc)

    result["host"]["loadavg_end"] = loadavg()
    result["waited_for_quiet_s"] = round(WAIT_BUDGET["spent_s"], 1)
    result["wall_seconds"] = round(time.perf_counter() - progress.started, 1)
    from benchmarks.report import evaluate_targets

    result["target_results"] = evaluate_targets(result)
    progress(f"done in {result['wall_seconds']} s")
    return result


def _source() -> dict:
    """The commit the suite ran from, and whether the working tree differed from it."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def _extra_chimera_loads(lat: dict | None) -> dict:
    """chimera loads to time in fresh processes besides the default one: the fp32 pick where it
    differs, and an ONNX Runtime pick where the default is not one."""
    if not lat or "variants" not in lat:
        return {}
    backend = {v["id"]: v["backend"] for v in lat["variants"]}
    extra = {}
    if lat["chimera_variant"] != lat["chimera_auto_variant"]:
        extra["chimera_fp32"] = {"precision": "fp32"}
    has_ort = any(v["passed_parity"] and v["backend"] == "onnxruntime" for v in lat["variants"])
    if backend.get(lat["chimera_auto_variant"]) != "onnxruntime" and has_ort:
        extra["chimera_ort"] = {"backend": "onnxruntime"}
    return extra


def _sanitize(obj):
    """JSON without NaN/Infinity (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    from benchmarks import report

    if args.docs_from:
        result = json.loads(args.docs_from.read_text())
        report.update_docs(result, REPO)
        print(f"rewrote {REPO / 'BENCHMARKS.md'} and the Performance section of {REPO / 'README.md'}")
        return 0

    # A SIGTERM (e.g. a CI timeout) unwinds normally, so servers are stopped and temp dirs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = _sanitize(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "results.json", args.out / "results.md"
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    markdown = report.render(result)
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    if args.update_docs:
        report.update_docs(result, REPO)
        print(f"rewrote {REPO / 'BENCHMARKS.md'} and the Performance section of {REPO / 'README.md'}")
    if result["errors"]:
        print(f"{len(result['errors'])} measurement(s) failed:", file=sys.stderr)
        for e in result["errors"]:
            print(f"  {e['model']} {e['phase']}: {e['error'].splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
