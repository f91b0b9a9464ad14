"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick`` completes and writes
a well-formed result. No timing is asserted — only that every measurement is present and
every figure is a finite number of the right sign."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLAVORS = ("chimera", "pytorch", "onnx")
PYFUNC = ("chimera", "chimera_auto", "pytorch", "onnx")


def _positive(value, what: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{what}: {value!r} is not finite and positive"


def _finite(value, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{what}: {value!r} is not finite"


def _check_latency(name: str, lat: dict, batches: list, raw_batches: list) -> None:
    for key in ("chimera_variant", "chimera_auto_variant"):
        assert isinstance(lat[key], str) and lat[key], f"{name}: {key}"
    ids = {v["id"] for v in lat["variants"]}
    assert lat["chimera_variant"] in ids and lat["chimera_auto_variant"] in ids
    assert any(v["passed_parity"] for v in lat["variants"])
    for b in batches:
        entry = lat["batches"][str(b)]
        where = f"{name} batch {b}"
        assert entry["failures"] == {}, f"{where}: {entry['failures']}"
        for contender in PYFUNC + ("eager_torch",):
            stats = entry["latency"][contender]
            for field in ("median_ms", "p90_ms", "min_ms"):
                _positive(stats[field], f"{where} {contender} {field}")
            assert stats["n"] >= 1
        for contender in PYFUNC:
            err = entry["max_abs_error_vs_eager"][contender]
            _finite(err, f"{where} {contender} error")
            assert err >= 0
        for contender in ("chimera", "chimera_auto", "onnx"):
            _positive(entry["ratio_vs_pytorch"][contender], f"{where} ratio {contender}")
        assert entry["rounds"] >= 1
        if b == 1:
            _finite(entry["pyfunc_minus_raw_us"], f"{where} pyfunc - raw")
            _finite(entry["onnx_pyfunc_minus_raw_us"], f"{where} onnx pyfunc - raw")
        if b in raw_batches:
            sel = entry["selection"]
            assert sel["raw_median_ms"], f"{where}: no raw runner timed"
            for vid, ms in sel["raw_median_ms"].items():
                _positive(ms, f"{where} raw {vid}")
            for label in ("auto", "fp32"):
                assert sel[label]["chosen"] in sel["raw_median_ms"]
                assert sel[label]["fastest"] in sel["raw_median_ms"]
                _positive(sel[label]["regret"], f"{where} regret {label}")
    ov = lat["overhead"]
    for field in ("total_us", "mlflow_layer_us", "chimera_layer_us"):
        _finite(ov[field], f"{name} overhead {field}")
    for n, us in ov["median_us"].items():
        _positive(us, f"{name} overhead median {n}")


def _check_cold_start(name: str, cs: dict, first: bool) -> None:
    flavors = cs["flavors"]
    floors = ("floor_python", "floor_import_mlflow", "floor_resolve_uri") if first else ("floor_resolve_uri",)
    for kind in FLAVORS + floors:
        entry = flavors[kind]
        _positive(entry["median_s"], f"{name} cold start {kind}")
        _positive(entry["peak_rss_mb"], f"{name} peak RSS {kind}")
        assert len(entry["samples_s"]) == cs["rounds"]
        assert isinstance(entry["torch_imported"], bool)
    for kind in FLAVORS:
        for phase in ("import_mlflow_s", "load_s", "first_predict_s"):
            _positive(flavors[kind][phase], f"{name} cold start {kind} {phase}")
    assert isinstance(flavors["chimera"]["variant"], str)
    assert flavors["pytorch"]["torch_imported"] is True  # the flavor that needs torch does import it
    _finite(cs["chimera_minus_onnx_s"], f"{name} chimera - onnx")


def _check_serving(name: str, sv: dict) -> None:
    for flavor in FLAVORS:
        entry = sv["flavors"][flavor]
        _positive(entry["startup_s"], f"{name} serve startup {flavor}")
        _finite(entry["max_abs_error_vs_eager"], f"{name} served error {flavor}")
        for c in sv["concurrency"]:
            level = entry["levels"][str(c)]
            assert level["errors"] == 0, f"{name} {flavor} c={c}: {level['error_kinds']}"
            assert level["requests"] > 0
            for field in ("throughput_rps", "p50_ms", "p99_ms"):
                _positive(level[field], f"{name} {flavor} c={c} {field}")
    assert isinstance(sv["flavors"]["chimera"]["variant"], str)
    _positive(sv["mlflow_request_handling_ms"], f"{name} MLflow's request handling")


@pytest.mark.slow
def test_quick_benchmark_completes_with_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the suite makes its own store
    env.pop("CHIMERA_BENCH_MAX_SECONDS", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-8000:]}"

    text = (out / "results.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite constant {c} in JSON"))
    assert result["schema_version"] == 1 and result["mode"] == "quick"
    assert result["errors"] == []
    host = result["host"]
    assert host["cpu_model"] and host["cpu_count"] >= 1
    for dist in ("mlflow", "torch", "onnxruntime", "transformers", "mlflow-chimera"):
        assert host["versions"][dist], dist
    _positive(result["wall_seconds"], "wall time")

    cfg = result["config"]
    assert set(cfg["models"]) == {"mlp", "cnn", "transformer", "bert"}
    assert set(result["models"]) == set(cfg["models"])
    assert cfg["batches"] == [1, 32]
    for name, m in result["models"].items():
        for flavor in FLAVORS:
            logged = m["logged"][flavor]
            assert logged["uri"].startswith("models:/"), logged
            _positive(logged["log_seconds"], f"{name} log {flavor}")
        _check_latency(name, m["latency"], cfg["batches"], cfg["raw_batches"])
        if name in cfg["cold_start"]["models"]:
            _check_cold_start(name, m["cold_start"], first=name == cfg["cold_start"]["models"][0])
        if name in cfg["serving"]["models"]:
            _check_serving(name, m["serving"])
    # Every measurement kind ran on at least one model.
    assert cfg["cold_start"]["models"] and cfg["serving"]["models"]

    targets = result["target_results"]
    kinds = {t["target"] for t in targets}
    assert len(kinds) == 5, kinds  # speed-up, regret (default and fp32), overhead, cold start
    for t in targets:
        assert set(t) >= {"target", "model", "goal", "measured", "display", "met"}

    markdown = (out / "results.md").read_text()
    for heading in ("## Targets", "## pyfunc `predict` latency, batch 1", "## Selection regret",
                    "## pyfunc overhead", "## Cold start", "## Served"):
        assert heading in markdown, heading

    # The README section and BENCHMARKS.md are generated from the same result.
    sys.path.insert(0, str(REPO))
    from benchmarks import report

    section = report.readme_section(result)
    assert section.startswith("## Performance") and result["host"]["cpu_model"] in section
    readme = (REPO / "README.md").read_text()
    updated = report.replace_section(readme, "## Performance", section)
    assert updated.count("## Performance") == 1
    assert updated.split("## Performance")[0] == readme.split("## Performance")[0]
    after = readme.split("## Performance", 1)[1].split("\n## ", 1)[1]
    assert updated.endswith(after)
