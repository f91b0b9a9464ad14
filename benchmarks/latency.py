"""In-process measurements of one model: pyfunc ``predict`` latency of the three flavors, the
raw runner of every parity-passed chimera variant (selection regret), and chimera's pyfunc
overhead — all interleaved in the same rounds.

Contenders per batch size (``predict`` on the same numpy array):

* ``chimera``: ``mlflow.pyfunc.load_model(uri, model_config={"precision": "fp32"})`` — the
  fastest fp32 variant that passed parity (the like-for-like comparison with the fp32 flavors);
* ``chimera_auto``: the opt-in load ``model_config={"accuracy": "any"}`` (may pick an int8 or
  bf16 variant, whose error against eager torch is reported); timed only when it picked
  another variant than ``chimera``, else the ``chimera`` figures are reused;
* ``pytorch``: ``mlflow.pytorch`` (pt2) pyfunc; ``onnx``: ``mlflow.onnx`` pyfunc;
* ``onnx_raw`` (batch 1): ``mlflow.onnx``'s own ``InferenceSession.run`` (its pyfunc overhead);
* ``eager_torch``: the original module under ``torch.inference_mode`` (context only);
* ``raw:<variant id>``: the raw runner (``get_raw_model().runner.run``) of every variant that
  passed parity and loads on this host, each loaded with ``model_config={"variant": id}``.

Selection regret = the raw latency of the variant chimera chose / that of the fastest
parity-passed variant, in this same run (batch 1 is what selection ranks by).

Pyfunc overhead is measured twice: as the difference of medians between chimera's pyfunc and
its own raw runner (real model, noisy at the µs scale), and with the runner replaced by a stub
that returns a precomputed output (layers only): ``mlflow_layer`` (MLflow's ``PyFuncModel.predict``:
prediction context and schema enforcement, the same for every flavor) and ``chimera_layer``
(``ChimeraPyfunc.predict`` → ``ChimeraModel.predict`` → input check), in microseconds.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import (
    BackgroundLoad,
    wait_for_quiet,
    estimate_seconds,
    interleaved,
    max_abs_error,
    ratio_spread,
    summarize,
)
from benchmarks.flavors import load

PYFUNC_CONTENDERS = ("chimera", "chimera_auto", "pytorch", "onnx")


class _StubRunner:
    """Returns a precomputed output: isolates the layers above the runner."""

    def __init__(self, outputs):
        self._outputs = outputs

    def run(self, inputs):
        return self._outputs


def load_contenders(logged: dict) -> dict:
    """Load every pyfunc model and every parity-passed chimera variant's runner."""
    loaded = {"load_seconds": {}, "variant_load_errors": {}}
    chimera_uri = logged["chimera"]["uri"]
    loaded["chimera"], loaded["load_seconds"]["chimera"] = load(chimera_uri, {"precision": "fp32"})
    loaded["chimera_auto"], loaded["load_seconds"]["chimera_auto"] = load(chimera_uri, {"accuracy": "any"})
    for flavor in ("pytorch", "onnx"):
        loaded[flavor], loaded["load_seconds"][flavor] = load(logged[flavor]["uri"])
    raw_fp32 = loaded["chimera"].get_raw_model()
    raw_auto = loaded["chimera_auto"].get_raw_model()
    runners = {raw_fp32.variant.id: raw_fp32.runner, raw_auto.variant.id: raw_auto.runner}
    for v in raw_fp32.variants:
        if not v.passed_parity or v.id in runners:
            continue
        try:
            model, _ = load(chimera_uri, {"variant": v.id})
            runners[v.id] = model.get_raw_model().runner
        except Exception as exc:  # noqa: BLE001 - e.g. a variant for another device
            loaded["variant_load_errors"][v.id] = f"{type(exc).__name__}: {str(exc)[:300]}"
    loaded["runners"] = runners
    return loaded


def describe_variants(raw) -> list:
    """Every variant of the model (from the loaded chimera model), with its log-time figures."""
    out = []
    for v in raw.variants:
        bench = v.benchmark_for(raw.decision.host_class) if v.benchmarks else None
        entry = {"id": v.id, "backend": v.backend, "precision": v.precision, "status": v.status,
                 "passed_parity": bool(v.passed_parity),
                 "parity_max_abs": None if v.parity is None else _finite_or_none(v.parity.max_abs),
                 "log_time_p50_ms": ({k: r["p50"] for k, r in bench.latency_ms.items()} if bench else None)}
        if v.reason:
            entry["reason"] = v.reason[:300]
        out.append(entry)
    return out


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


def _timed_when_quiet(contenders: dict, estimates: dict, timing: dict, quiet: dict | None):
    """Interleaved timing; on a busy host (other processes above ``quiet["threshold_cores"]``),
    wait for a quiet spell and time again, up to ``quiet["retries"]`` times, keeping the
    attempt with the least background load. Returns (timed, background cores, attempts)."""
    quiet = quiet or {}
    threshold = quiet.get("threshold_cores", 0.25)
    attempts, best = [], None
    for attempt in range(1 + quiet.get("retries", 0)):
        wait = wait_for_quiet(quiet.get("max_wait_s", 0), threshold)
        with BackgroundLoad() as background:
            timed = interleaved(contenders, estimates=estimates, **timing)
        attempts.append({"waited_s": wait["waited_s"], "background_cpu_cores": background.cores})
        cores = background.cores if background.cores is not None else 0.0
        if best is None or cores < best[1]:
            best = (timed, cores)
        if cores <= threshold:
            break
    return best[0], best[1], attempts


def measure_model(spec, loaded: dict, *, batches, timing: dict, raw_batches, overhead_timing: dict,
                  quiet: dict | None = None) -> dict:
    """Latency per batch, pyfunc overhead and selection regret for one model."""
    import torch

    raw_fp32 = loaded["chimera"].get_raw_model()
    raw_auto = loaded["chimera_auto"].get_raw_model()
    input_name = raw_fp32.signature.input_names[0]
    onnx_session = loaded["onnx"].get_raw_model()
    onnx_input = onnx_session.get_inputs()[0].name
    fp32_id, auto_id = raw_fp32.variant.id, raw_auto.variant.id

    result = {"chimera_variant": fp32_id, "chimera_auto_variant": auto_id,
              "chimera_auto_precision": raw_auto.variant.precision,
              "variants": describe_variants(raw_fp32),
              "variant_load_errors": loaded["variant_load_errors"],
              "load_seconds": loaded["load_seconds"], "batches": {}}

    for b in batches:
        x = spec.make_input(b, 100 + b)
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            expected = spec.module(tx).numpy()

        def eager(tx=tx):
            with torch.inference_mode():
                return spec.module(tx)

        feed = {input_name: x}
        contenders = {name: (lambda m=loaded[name]: m.predict(x)) for name in PYFUNC_CONTENDERS
                      if not (name == "chimera_auto" and auto_id == fp32_id)}
        if b == 1:
            contenders["onnx_raw"] = lambda: onnx_session.run(None, {onnx_input: x})
        contenders["eager_torch"] = eager
        if b in raw_batches:
            for vid, runner in loaded["runners"].items():
                contenders[f"raw:{vid}"] = lambda r=runner: r.run(feed)

        errors, failures, estimates = {}, {}, {}
        for name, fn in list(contenders.items()):
            try:
                out = fn()  # checks it runs; warms up (compiles, allocates)
                if name in PYFUNC_CONTENDERS:
                    errors[name] = max_abs_error(out, expected)
                estimates[name] = estimate_seconds(fn, warm=False)
            except Exception as exc:  # noqa: BLE001 - e.g. a static-batch model at another batch
                failures[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                del contenders[name]
        started = time.perf_counter()
        timed, background, attempts = _timed_when_quiet(contenders, estimates, timing, quiet)
        stats = {n: summarize(t["samples"]) for n, t in timed.items()}
        for n, t in timed.items():
            stats[n]["calls_per_block"] = t["calls_per_block"]
        if auto_id == fp32_id and "chimera" in stats:
            stats["chimera_auto"] = dict(stats["chimera"], same_as="chimera")
            errors["chimera_auto"] = errors.get("chimera")
        entry = {"latency": stats, "max_abs_error_vs_eager": errors, "failures": failures,
                 "reference_max_abs": float(np.max(np.abs(expected))),
                 "rounds": len(next(iter(timed.values()))["round_medians"]) if timed else 0,
                 "timing_seconds": round(time.perf_counter() - started, 1),
                 "background_cpu_cores": background, "attempts": attempts}
        if "pytorch" in stats:
            entry["ratio_vs_pytorch"] = {n: stats["pytorch"]["median_ms"] / stats[n]["median_ms"]
                                         for n in ("chimera", "chimera_auto", "onnx") if n in stats}
            entry["ratio_vs_pytorch_rounds"] = {
                n: ratio_spread(timed["pytorch"]["round_medians"], timed[n]["round_medians"])
                for n in ("chimera", "chimera_auto", "onnx") if n in timed}
        if f"raw:{fp32_id}" in stats and "chimera" in stats:
            entry["pyfunc_minus_raw_us"] = 1e3 * (stats["chimera"]["median_ms"]
                                                  - stats[f"raw:{fp32_id}"]["median_ms"])
        if "onnx_raw" in stats and "onnx" in stats:
            entry["onnx_pyfunc_minus_raw_us"] = 1e3 * (stats["onnx"]["median_ms"] - stats["onnx_raw"]["median_ms"])
        if b in raw_batches:
            entry["selection"] = _regret(stats, timed, raw_fp32.variants, fp32_id, auto_id)
        result["batches"][str(b)] = entry

    result["overhead"] = measure_overhead(spec, loaded["chimera"], overhead_timing)
    return result


def _regret(stats: dict, timed: dict, variants: list, fp32_id: str, auto_id: str) -> dict:
    raw = {n[4:]: s["median_ms"] for n, s in stats.items() if n.startswith("raw:")}
    if not raw:
        return {}
    precision = {v.id: v.precision for v in variants}
    out = {"raw_median_ms": raw}
    for label, chosen, pool in (
        ("auto", auto_id, raw),
        ("fp32", fp32_id, {k: t for k, t in raw.items() if precision.get(k) == "fp32"}),
    ):
        if chosen not in raw or not pool:
            continue
        fastest = min(pool, key=pool.get)
        out[label] = {"chosen": chosen, "fastest": fastest, "regret": raw[chosen] / pool[fastest],
                      "rounds": ratio_spread(timed[f"raw:{chosen}"]["round_medians"],
                                             timed[f"raw:{fastest}"]["round_medians"])}
    return out


def measure_overhead(spec, pyfunc_model, timing: dict) -> dict:
    """Layers above the runner, with the runner replaced by a stub (restored afterwards)."""
    raw = pyfunc_model.get_raw_model()
    x = spec.make_input(1, 7)
    feed = {raw.signature.input_names[0]: x}
    real_runner = raw.runner
    outputs = real_runner.run(feed)
    wrapper = pyfunc_model._model_impl  # ChimeraPyfunc, below MLflow's PyFuncModel
    raw.runner = _StubRunner(outputs)
    try:
        contenders = {"pyfunc": lambda: pyfunc_model.predict(x), "chimera_pyfunc": lambda: wrapper.predict(x),
                      "chimera_model": lambda: raw.predict(x), "runner": lambda: raw.runner.run(feed)}
        with BackgroundLoad() as background:
            timed = interleaved(contenders, **timing)
    finally:
        raw.runner = real_runner
    med = {n: float(np.median(t["samples"])) * 1e6 for n, t in timed.items()}
    return {
        "method": "runner replaced by a stub returning a precomputed output; medians of per-call times",
        "median_us": med,
        "total_us": med["pyfunc"] - med["runner"],
        "mlflow_layer_us": med["pyfunc"] - med["chimera_pyfunc"],
        "chimera_layer_us": med["chimera_pyfunc"] - med["runner"],
        "calls": {n: len(t["samples"]) for n, t in timed.items()},
        "background_cpu_cores": background.cores,
    }
