"""Markdown from a result JSON: the full tables (``results.md``, the generated part of
``BENCHMARKS.md``) and the README's "## Performance" section, plus the target verdicts."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

FLAVOR_LABELS = {"chimera": "mlflow.chimera", "chimera_fp32": "mlflow.chimera (fp32)",
                 "chimera_ort": "mlflow.chimera (backend onnxruntime)",
                 "chimera_batched": "mlflow.chimera, dynamic batching (max 32, 2 ms)",
                 "pytorch": "mlflow.pytorch (pt2)", "onnx": "mlflow.onnx",
                 "floor_python": "floor: python + numpy", "floor_import_mlflow": "floor: import mlflow",
                 "floor_resolve_uri": "floor: import mlflow + resolve/download models:/ URI"}
BEGIN, END = "<!-- benchmarks:generated:begin -->", "<!-- benchmarks:generated:end -->"


# -- formatting --------------------------------------------------------------------------------


def _ms(x) -> str:
    if x is None:
        return "–"
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.1f}"


def _x(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _s(x) -> str:
    if x is None:
        return "–"
    return f"{x:.2f} s" if abs(x) >= 1 else f"{x:.3f} s"


def _e(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def _bg(cores) -> str:
    if cores is None:
        return "–"
    return f"{cores:.2f}" + (" ⚠" if cores > 0.25 else "")


def _ok(met) -> str:
    return {True: "✅ met", False: "❌ missed", None: "–"}[met]


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def machine_line(result: dict) -> str:
    h = result["host"]
    v = h["versions"]
    flags = ", ".join(h.get("cpu_flags") or []) or "no AVX-512"
    src = result.get("source") or {}
    source = ""
    if src.get("git_commit"):
        source = f"; source: commit {src['git_commit'][:10]}" + (" with uncommitted changes" if src.get("git_dirty")
                                                                 else "")
    return (f"{h['cpu_model']}, {h['cpu_count']} vCPUs ({flags}), {h.get('memory_gib')} GiB, "
            f"{h['platform']}, Python {h['python']}; mlflow {v.get('mlflow')}, torch {v.get('torch')} "
            f"({h['torch_num_threads']} threads), onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, "
            f"transformers {v.get('transformers')}, mlflow-chimera {v.get('mlflow-chimera')}{source}")


# -- targets -----------------------------------------------------------------------------------


def evaluate_targets(result: dict) -> list:
    """One row per (target, model): the goal, the measured value, met or not."""
    targets = result["targets"]
    rows = []
    for name, m in result["models"].items():
        b1 = _get(m, "latency", "batches", "1") or {}
        goal = targets["batch1_fp32_speedup_vs_pytorch"].get(name)
        ratio = _get(b1, "ratio_vs_pytorch", "chimera")
        rows.append({"target": "batch-1 pyfunc speed-up vs mlflow.pytorch (fp32 variants)", "model": name,
                     "goal": f"≥ {goal:g}×" if goal else "(no target)", "measured": ratio,
                     "display": f"{_x(ratio)} ({_get(m, 'latency', 'chimera_variant')})",
                     "met": None if goal is None or ratio is None else ratio >= goal})
        for label, key in (("auto", "selection regret at batch 1 (opt-in pick, any accuracy)"),
                           ("fp32", "selection regret at batch 1 (fp32 pick)")):
            sel = _get(b1, "selection", label)
            regret = _get(sel, "regret")
            rows.append({"target": key, "model": name, "goal": f"≤ {targets['selection_regret_max']:g}",
                         "measured": regret,
                         "display": "–" if sel is None else
                         f"{regret:.3f} (chose {sel['chosen']}, fastest {sel['fastest']})",
                         "met": None if regret is None else regret <= targets["selection_regret_max"]})
        ov = _get(m, "latency", "overhead")
        if ov:
            rows.append({"target": "pyfunc overhead over the raw runner (chimera's layer)", "model": name,
                         "goal": f"≤ {targets['pyfunc_overhead_us_max']:g} µs", "measured": ov["chimera_layer_us"],
                         "display": f"{ov['chimera_layer_us']:.1f} µs (through mlflow.pyfunc: "
                                    f"{ov['total_us']:.1f} µs, of which MLflow's PyFuncModel "
                                    f"{ov['mlflow_layer_us']:.1f} µs)",
                         "met": ov["chimera_layer_us"] <= targets["pyfunc_overhead_us_max"]})
        batching = _batching_target(name, m, targets)
        if batching:
            rows.append(batching)
        cs = _get(m, "cold_start", "flavors")
        if cs:
            label = m["cold_start"].get("chimera_ort_flavor") or "chimera"
            ch = cs[label]
            delta = ch["median_s"] - cs["onnx"]["median_s"]
            variant = ch.get("variant") or ""
            ort = isinstance(variant, str) and variant.startswith("onnxruntime")
            default = cs["chimera"]
            note = "" if label == "chimera" else (
                f"; default pick {default.get('variant')}: {default['median_s']:.2f} s, torch imported: "
                f"{'yes' if default['torch_imported'] else 'no'}")
            rows.append({"target": "cold start minus mlflow.onnx's (ONNX Runtime pick, no torch)", "model": name,
                         "goal": f"≤ {targets['cold_start_minus_onnx_s_max']:g} s", "measured": delta,
                         "display": f"{delta:+.3f} s ({ch['median_s']:.2f} vs {cs['onnx']['median_s']:.2f} s; "
                                    f"{variant}; torch imported: {'yes' if ch['torch_imported'] else 'no'}{note})",
                         "met": delta <= targets["cold_start_minus_onnx_s_max"] and ort
                         and not ch["torch_imported"]})
    return rows


def _batching_target(name: str, m: dict, targets: dict) -> dict | None:
    """Served throughput at 8 clients with dynamic batching on over off (p99 no worse), where
    both were served; the goal where one is set for the model."""
    sv = _get(m, "serving", "flavors") or {}
    on, off = _get(sv, "chimera_batched", "levels", "8"), _get(sv, "chimera", "levels", "8")
    if not on or not off or not off.get("throughput_rps"):
        return None
    ratio = on["throughput_rps"] / off["throughput_rps"]
    goal = (targets.get("served_batching_speedup_c8") or {}).get(name)
    p99_ok = on.get("p99_ms") is not None and off.get("p99_ms") is not None and on["p99_ms"] <= off["p99_ms"]
    handling = _get(m, "serving", "mlflow_request_handling_ms")
    why = "" if handling is None else f"; MLflow's JSON handling alone {handling:.1f} ms per request"
    return {"target": "served throughput at 8 clients, batching on / off (p99 no worse)", "model": name,
            "goal": f"≥ {goal:g}×" if goal else "(no target)", "measured": ratio,
            "display": f"{_x(ratio)} ({on['throughput_rps']:.1f} vs {off['throughput_rps']:.1f} req/s; p99 "
                       f"{_ms(on.get('p99_ms'))} vs {_ms(off.get('p99_ms'))} ms{why})",
            "met": None if goal is None else ratio >= goal and p99_ok}


# -- full tables -------------------------------------------------------------------------------


def _latency_table(result: dict, batch: str) -> list:
    lines = ["| model | chimera fp32 variant | mlflow.chimera | mlflow.pytorch (pt2) | mlflow.onnx | eager torch "
             "(no MLflow) | chimera vs pytorch | onnx vs pytorch | rounds | other load (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        b = _get(m, "latency", "batches", batch)
        if not b:
            continue
        lat = b["latency"]

        def cell(n):
            s = lat.get(n)
            if s is None:
                return "fails: " + b["failures"].get(n, "–")[:80] if n in b.get("failures", {}) else "–"
            return f"{_ms(s['median_ms'])} / {_ms(s['p90_ms'])}"

        ratio = b.get("ratio_vs_pytorch", {})
        spread = _get(b, "ratio_vs_pytorch_rounds", "chimera")
        spread_s = f" [{spread['p10']:.2f}–{spread['p90']:.2f}]" if spread else ""
        lines.append(f"| {name} | `{m['latency']['chimera_variant']}` | {cell('chimera')} | {cell('pytorch')} | "
                     f"{cell('onnx')} | {cell('eager_torch')} | **{_x(ratio.get('chimera'))}**{spread_s} | "
                     f"{_x(ratio.get('onnx'))} | {b['rounds']} | {_bg(b['background_cpu_cores'])} |")
    return lines


def _auto_table(result: dict) -> list:
    lines = ["| model | batch | opt-in pick | precision | median / p90 ms | vs pytorch | max abs error vs eager "
             "(opt-in pick) | (fp32 pick) | (mlflow.pytorch) | (mlflow.onnx) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lat = m.get("latency")
        if not lat or "batches" not in lat:
            continue
        for batch, b in lat["batches"].items():
            s = b["latency"].get("chimera_auto")
            err = b["max_abs_error_vs_eager"]
            lines.append(f"| {name} | {batch} | `{lat['chimera_auto_variant']}` | {lat['chimera_auto_precision']} | "
                         f"{_ms(_get(s, 'median_ms'))} / {_ms(_get(s, 'p90_ms'))} | "
                         f"{_x(_get(b, 'ratio_vs_pytorch', 'chimera_auto'))} | {_e(err.get('chimera_auto'))} | "
                         f"{_e(err.get('chimera'))} | {_e(err.get('pytorch'))} | {_e(err.get('onnx'))} |")
    return lines


def _overhead_table(result: dict) -> list:
    lines = ["| model | chimera's layer (stub runner) | MLflow's PyFuncModel layer | total pyfunc − runner (stub) | "
             "pyfunc − raw runner (real model, batch 1) | mlflow.onnx pyfunc − its session.run (batch 1) |",
             "|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        ov = _get(m, "latency", "overhead")
        b1 = _get(m, "latency", "batches", "1")
        if not ov or not b1:
            continue

        def us(x):
            return "–" if x is None else f"{x:.1f} µs"

        # A difference of two medians is below the noise once the model itself takes more than ~1 ms.
        small = (_get(b1, "latency", "onnx_raw", "median_ms") or 1e9) < 1.0
        na = "– (model > 1 ms: below noise)"
        lines.append(f"| {name} | **{us(ov['chimera_layer_us'])}** | {us(ov['mlflow_layer_us'])} | "
                     f"{us(ov['total_us'])} | {us(b1.get('pyfunc_minus_raw_us')) if small else na} | "
                     f"{us(b1.get('onnx_pyfunc_minus_raw_us')) if small else na} |")
    return lines


def _regret_table(result: dict) -> list:
    lines = ["| model | batch | raw runner median, ms (every parity-passed variant) | opt-in pick → fastest | "
             "regret | fp32 pick → fastest fp32 | regret (fp32) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lat = m.get("latency")
        if not lat or "batches" not in lat:
            continue
        for batch, b in lat["batches"].items():
            sel = b.get("selection")
            if not sel:
                continue
            raw = sel["raw_median_ms"]
            listing = "<br>".join(f"`{k}` {_ms(v)}" for k, v in sorted(raw.items(), key=lambda kv: kv[1]))
            a, f = sel.get("auto"), sel.get("fp32")
            lines.append(
                f"| {name} | {batch} | {listing} | "
                + (f"`{a['chosen']}` → `{a['fastest']}` | **{a['regret']:.3f}** | " if a else "– | – | ")
                + (f"`{f['chosen']}` → `{f['fastest']}` | **{f['regret']:.3f}** |" if f else "– | – |"))
    return lines


def _variants_table(result: dict) -> list:
    lines = ["| model | variant | status | parity max abs | log-time p50 ms (batch 1) | same-run raw median ms "
             "(batch 1) |", "|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lat = m.get("latency")
        if not lat or "variants" not in lat:
            continue
        raw = _get(lat, "batches", "1", "selection", "raw_median_ms") or {}
        for v in lat["variants"]:
            p50 = (v.get("log_time_p50_ms") or {}).get("1")
            status = v["status"] + (f" ({v['reason'][:90]})" if v.get("reason") else "")
            if v["id"] in lat.get("variant_load_errors", {}):
                status += f"; does not load here: {lat['variant_load_errors'][v['id']][:90]}"
            lines.append(f"| {name} | `{v['id']}` | {status} | {_e(v.get('parity_max_abs'))} | {_ms(p50)} | "
                         f"{_ms(raw.get(v['id']))} |")
    return lines


def _cold_table(result: dict) -> list:
    lines = ["| model | flavor | variant | spawn → first prediction (median) | samples | import mlflow | "
             "load_model | first predict | peak RSS | torch imported |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        cs = _get(m, "cold_start", "flavors")
        if not cs:
            continue
        for flavor, c in cs.items():
            samples = ", ".join(f"{s:.2f}" for s in c["samples_s"])
            lines.append(f"| {name} | {FLAVOR_LABELS.get(flavor, flavor)} | {c.get('variant', '')} | "
                         f"**{_s(c['median_s'])}** | {samples} | {_s(c.get('import_mlflow_s'))} | "
                         f"{_s(c.get('load_s'))} | {_s(c.get('first_predict_s'))} | {c['peak_rss_mb']:.0f} MB | "
                         f"{'yes' if c['torch_imported'] else 'no'} |")
    return lines


def first_cold(result: dict) -> dict | None:
    for m in result["models"].values():
        if _get(m, "cold_start", "flavors"):
            return m["cold_start"]
    return None


def _serving_table(result: dict) -> list:
    levels = None
    rows = []
    for name, m in result["models"].items():
        sv = _get(m, "serving", "flavors")
        if not sv:
            continue
        levels = m["serving"]["concurrency"]
        for flavor, f in sv.items():
            cells = []
            for c in levels:
                lv = f["levels"][str(c)]
                cells.append(f"{lv['throughput_rps']:.0f} | {_ms(lv['p50_ms'])} | {_ms(lv['p99_ms'])}")
            errors = sum(f["levels"][str(c)]["errors"] for c in levels)
            rss = f.get("rss_mb_after_load")
            lines_variant = f" (`{f['variant']}`)" if f.get("variant") else ""
            rows.append(f"| {name} | {FLAVOR_LABELS[flavor]}{lines_variant} | {_s(f['startup_s'])} | "
                        + " | ".join(cells) + f" | {'–' if rss is None else f'{rss:.0f} MB'} | {errors} |")
    if not rows:
        return []
    head = "| model | flavor | spawn → /ping | " + " | ".join(
        f"c={c} req/s | c={c} p50 ms | c={c} p99 ms" for c in levels) + " | server RSS | errors |"
    sep = "|---|---|---|" + "---|---|---|" * len(levels) + "---|---|"
    return [head, sep] + rows


def _targets_table(result: dict) -> list:
    lines = ["| target | model | goal | measured | verdict |", "|---|---|---|---|---|"]
    for t in result.get("target_results") or evaluate_targets(result):
        lines.append(f"| {t['target']} | {t['model']} | {t['goal']} | {t['display']} | {_ok(t['met'])} |")
    return lines


def _targets_matrix(result: dict) -> list:
    """Targets × models, one compact cell each (for the README)."""
    rows = result.get("target_results") or evaluate_targets(result)
    models = list(dict.fromkeys(t["model"] for t in rows))
    kinds = list(dict.fromkeys(t["target"] for t in rows))
    lines = ["| target | goal | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for kind in kinds:
        cells, goal = [], ""
        for model in models:
            t = next((t for t in rows if t["target"] == kind and t["model"] == model), None)
            if t is None or t["measured"] is None:
                cells.append("–")
                continue
            goal = goal if t["goal"].startswith("(") else t["goal"]
            value = t["measured"]
            if "speed-up" in kind or "batching on / off" in kind:
                shown = f"{value:.2f}×"
            elif "regret" in kind:
                shown = f"{value:.3f}"
            elif "overhead" in kind:
                shown = f"{value:.1f} µs"
            else:
                shown = f"{value:+.3f} s"
            cells.append(shown + {True: " ✅", False: " ❌", None: ""}[t["met"]])
        goals = [t for t in rows if t["target"] == kind and not t["goal"].startswith("(")]
        if len({t["goal"] for t in goals}) > 1 or len(goals) == 1 < len(models):  # per-model goals: name each
            goal = ", ".join(f"{t['model']} {t['goal']}" for t in rows
                             if t["target"] == kind and not t["goal"].startswith("("))
        lines.append(f"| {kind} | {goal} | " + " | ".join(cells) + " |")
    return lines


def _contention(result: dict) -> str:
    phases = []
    for name, m in result["models"].items():
        for batch, b in (_get(m, "latency", "batches") or {}).items():
            phases.append((f"{name} latency b{batch}", b.get("background_cpu_cores")))
        phases.append((f"{name} cold start", _get(m, "cold_start", "background_cpu_cores")))
        phases.append((f"{name} serving", _get(m, "serving", "background_cpu_cores_excluding_servers")))
    known = [(n, c) for n, c in phases if c is not None]
    if not known:
        return "Contention: not measured."
    busy = [f"{n} ({c:.2f})" for n, c in known if c > 0.25]
    worst = max(c for _, c in known)
    h = result["host"]
    return (f"Contention: other processes used up to {worst:.2f} of {h['cpu_count']} cores while timing "
            f"(load average {h.get('loadavg_start')} → {h.get('loadavg_end')}). "
            + (f"Phases above 0.25 cores (⚠, absolute times inflated): {', '.join(busy)}."
               if busy else "No phase above 0.25 cores."))


def render(result: dict) -> str:
    cfg = result["config"]
    out = [f"# chimera vs MLflow flavors — {result['mode']} run, {result['timestamp']}", "",
           f"Machine: {machine_line(result)}.", "",
           f"Command: `{result['command']}`; wall time {result.get('wall_seconds')} s. "
           f"{_contention(result)}", ""]
    if result.get("errors"):
        out += ["**Failed measurements:** " + "; ".join(f"{e['model']} {e['phase']}: {e['error'][:200]}"
                                                   for e in result["errors"]), ""]
    out += ["## Targets", ""] + _targets_table(result)
    for batch in [str(b) for b in cfg["batches"]]:
        out += ["", f"## pyfunc `predict` latency, batch {batch} (ms, median / p90; fp32 variants)", "",
                "chimera loaded with `model_config={\"precision\": \"fp32\"}`; speed-up = mlflow.pytorch median / "
                "contender median, [p10–p90 of the per-round ratio].", ""] + _latency_table(result, batch)
    out += ["", "## chimera's opt-in pick (`model_config={\"accuracy\": \"any\"}`; may be int8 or bf16)", ""] + \
        _auto_table(result)
    out += ["", "## pyfunc overhead", "",
            "Stub runner: the chosen variant's runner replaced by one returning a precomputed output, so only the "
            "layers above it are timed. MLflow's PyFuncModel layer (prediction context, input schema "
            "enforcement) is the same for every flavor.", ""] + _overhead_table(result)
    out += ["", "## Selection regret (raw runners of every parity-passed variant, same rounds)", ""] \
        + _regret_table(result)
    out += ["", "## Variants built at log time", ""] + _variants_table(result)
    cold = _cold_table(result)
    if len(cold) > 2:
        out += ["", "## Cold start: fresh process, `models:/` URI → first prediction", "",
                f"{_get(first_cold(result), 'rounds')} interleaved round(s)"
                + (" after one untimed spawn of each" if _get(first_cold(result), "warmup_spawns") else "")
                + "; peak RSS is the child's `VmHWM`. The floors bound what any flavor can reach: a bare "
                "interpreter, `import mlflow`, and `import mlflow` plus MLflow resolving and downloading the "
                "`mlflow.onnx` model's `models:/` URI.", ""] + cold
    serve = _serving_table(result)
    if serve:
        out += ["", "## Served: `mlflow models serve -w 1`, batch-1 JSON, closed loop on 127.0.0.1", ""] + serve
        handling = [(name, _get(m, "serving", "mlflow_request_handling_ms"), _get(m, "serving", "payload_bytes"))
                    for name, m in result["models"].items()]
        handling = [h for h in handling if h[1] is not None]
        if handling:
            out += ["", "MLflow's scoring server's own work per request, outside `predict` (its `invocations`: parse "
                    "the JSON, check it against the signature, write the JSON answer; timed in-process with a "
                    "model that answers at once). Every flavor pays it on the GIL, and dynamic batching cannot "
                    "merge it: " + "; ".join(f"{n} {ms:.1f} ms ({size / 1024:.0f} KiB request)"
                                              for n, ms, size in handling) + "."]
    spark = [(name, m["spark"]) for name, m in result["models"].items() if isinstance(m.get("spark"), dict)]
    if spark:
        out += ["", "## Batch scoring: `mlflow.pyfunc.spark_udf` on a local Spark", "",
                "Same cached DataFrame (one flattened example per row), `env_manager=\"local\"`, "
                "`result_type=\"array<float>\"`, interleaved rounds; the first pass of each (model loads, "
                "variant fetch) untimed.", "",
                "| model | master | rows | mlflow.chimera rows/s | mlflow.pytorch (pt2) rows/s | speed-up | "
                "max abs diff |", "|---|---|---|---|---|---|---|"]
        for name, sp in spark:
            if "rows_per_s" not in sp:
                out.append(f"| {name} | – | – | {sp.get('skipped') or sp.get('error', '')[:120]} | | | |")
                continue
            rps = sp["rows_per_s"]
            out.append(f"| {name} | {sp['master']} | {sp['rows']} | {rps['chimera']:.0f} | {rps['pytorch']:.0f} | "
                       f"{_x(sp['speedup_vs_pytorch'])} | {_e(sp['max_abs_diff_chimera_vs_pytorch'])} |")
    out += ["", "## Logging", "", "| model | flavor | log_model (s) | notes |", "|---|---|---|---|"]
    for name, m in result["models"].items():
        for flavor, info in (m.get("logged") or {}).items():
            if not isinstance(info, dict) or "log_seconds" not in info:
                continue
            note = {"pytorch": f"serialization_format={info.get('serialization_format')}, example batch "
                               f"{info.get('example_batch')}",
                    "onnx": f"+ {info.get('export_seconds')} s torch.onnx.export (dynamo); providers: "
                            f"{info.get('execution_providers')}",
                    "chimera": f"log-time benchmark: {info.get('log_time_benchmark')}"}[flavor]
            out.append(f"| {name} | {FLAVOR_LABELS[flavor]} | {info['log_seconds']} | {note} |")
    return "\n".join(out) + "\n"


# -- README / BENCHMARKS.md ----------------------------------------------------------------------


def readme_section(result: dict) -> str:
    lat_lines = ["| model | chimera variant (fp32) | mlflow.chimera | mlflow.pytorch (pt2) | mlflow.onnx | "
                 "speed-up vs mlflow.pytorch | batch-32 speed-up |", "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        b1 = _get(m, "latency", "batches", "1")
        b32 = _get(m, "latency", "batches", "32")
        if not b1:
            continue
        med = lambda b, n: _ms(_get(b, "latency", n, "median_ms"))  # noqa: E731
        lat_lines.append(f"| {name} | `{m['latency']['chimera_variant']}` | {med(b1, 'chimera')} ms | "
                         f"{med(b1, 'pytorch')} ms | {med(b1, 'onnx')} ms | "
                         f"**{_x(_get(b1, 'ratio_vs_pytorch', 'chimera'))}** | "
                         f"{_x(_get(b32, 'ratio_vs_pytorch', 'chimera'))} |")
    cold_lines = ["| model | mlflow.chimera | mlflow.pytorch (pt2) | mlflow.onnx | floor (import mlflow + "
                  "resolve URI) | chimera peak RSS | torch imported by chimera |", "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        cs = _get(m, "cold_start", "flavors")
        if not cs:
            continue
        ort = m["cold_start"].get("chimera_ort_flavor")
        chim = f"{_s(cs['chimera']['median_s'])} (`{cs['chimera'].get('variant')}`)"
        if ort and ort != "chimera":
            chim += f"; ONNX Runtime pick {_s(cs[ort]['median_s'])}"
        cold_lines.append(f"| {name} | {chim} | {_s(cs['pytorch']['median_s'])} | "
                          f"{_s(cs['onnx']['median_s'])} | {_s(_get(cs, 'floor_resolve_uri', 'median_s'))} | "
                          f"{cs['chimera']['peak_rss_mb']:.0f} MB (pytorch {cs['pytorch']['peak_rss_mb']:.0f}, "
                          f"onnx {cs['onnx']['peak_rss_mb']:.0f}) | "
                          f"{'yes' if cs['chimera']['torch_imported'] else 'no'} |")
    lines = [
        "## Performance", "",
        "`python -m benchmarks.run` logs every model of a set (MLP, CNN, transformer encoder, a small "
        "random-weight `transformers` BERT) three ways — `mlflow.chimera`, `mlflow.pytorch` (pt2) and "
        "`mlflow.onnx` — into one temporary tracking store, and measures them side by side in one run: "
        "pyfunc `predict` latency (interleaved in one process), pyfunc overhead, selection regret, "
        "cold start in fresh processes by `models:/` URI, and `mlflow models serve` under a closed-loop "
        "load. `--quick` is the ~3-minute smoke version that CI runs (`tests/test_benchmarks.py`).", "",
        "```bash",
        ".venv/bin/pip install -q -c constraints.txt -e \".[bench]\" && .venv/bin/python -m benchmarks.run",
        "```", "",
        f"Measured {result['timestamp'][:10]} ({result['mode']} run, wall time "
        f"{result.get('wall_seconds')} s) on: {machine_line(result)}. {_contention(result)} "
        "Ratios come from the same rounds; absolute times drift by up to ±30 % between runs on shared "
        "machines.", "",
        "Batch-1 pyfunc `predict`, medians (chimera restricted to fp32 variants):", "",
    ] + lat_lines + ["", "Cold start (fresh process → first prediction, median):", ""] + cold_lines + [
        "", "Targets (reported, not asserted):", ""] + _targets_matrix(result) + [
        "", "Every table (p90, batch 32, the opt-in (int8/bf16) picks and their error, overhead breakdown, selection "
        "regret per variant, serving throughput and p50/p99) is in `BENCHMARKS.md`, generated with this "
        "section from `benchmarks/results/results.json` (`python -m benchmarks.run --docs-from "
        "benchmarks/results/results.json`); its last section says why a missed target is missed and what "
        "would close it.", ""]
    return "\n".join(_wrap(line) for line in lines) + "\n"


def _wrap(line: str, width: int = 95) -> str:
    """Wrap prose like the rest of the README; leave tables, code and headings alone."""
    if not line or line.startswith(("|", "#", "`" * 3, "    ")):
        return line
    return textwrap.fill(line, width=width, break_long_words=False, break_on_hyphens=False)


def replace_section(text: str, heading: str, new_section: str) -> str:
    """Replace the Markdown section that starts with ``heading`` up to the next "## " heading."""
    pattern = re.compile(rf"^{re.escape(heading)}\s*$.*?(?=^## |\Z)", re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"no {heading!r} section found")
    return pattern.sub(lambda _: new_section.rstrip("\n") + "\n\n", text, count=1)


def update_docs(result: dict, repo: Path) -> None:
    readme = repo / "README.md"
    readme.write_text(replace_section(readme.read_text(), "## Performance", readme_section(result)))
    bench = repo / "BENCHMARKS.md"
    generated = BEGIN + "\n" + re.sub(r"^(#+) ", r"#\1 ", render(result), flags=re.M) + END
    text = bench.read_text() if bench.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END):]
    else:
        text = ("# Benchmark results\n\nGenerated by `python -m benchmarks.run --update-docs` (or `--docs-from "
                "benchmarks/results/results.json`); edit only outside the generated block.\n\n" + generated + "\n")
    bench.write_text(text)
