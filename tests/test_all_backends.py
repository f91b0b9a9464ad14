"""Every backend this CPU host can build — ONNX Runtime fp32/int8, OpenVINO, AOTInductor,
torch.compile and eager — built, parity-gated, benchmarked and ranked together; host-specific
compatibility."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest

import models
from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.openvino_backend import OpenVINOBackend
from mlflow_chimera.runtime import read_variants
from mlflow_chimera.selection import rank, tie_band

EXPECTED_BACKENDS = {"onnxruntime", "openvino", "aotinductor", "torch_compile", "eager"}


@pytest.fixture(scope="module", params=["mlp", "cnn", "transformer"])
def everything(request, logged):
    return (request.param, *logged.get(request.param, backends=None))


@pytest.mark.slow
def test_every_backend_is_built_gated_timed_and_the_fastest_is_loaded(everything):
    kind, info, model, example, name = everything
    variants = info.flavors["chimera"]["variants"]
    assert {v["backend"] for v in variants.values()} == EXPECTED_BACKENDS
    bf16 = {"bf16"} if OpenVINOBackend().plan(["bf16"], host_mod.fingerprint()) else set()
    assert {v["precision"] for v in variants.values()} == {"fp32", "int8"} | bf16
    for vid, v in variants.items():
        assert v["status"] in ("ready", "failed_parity"), (vid, v.get("reason"))
        if v["status"] == "ready":  # timed side by side after the builds: those that passed parity
            assert v["p50_ms"]["1"] > 0, vid
        if v["precision"] == "fp32":
            assert v["status"] == "ready", (vid, v.get("reason"))
    # By default the fastest fp32 variant (or one tied with it within the measurement noise):
    # lossy ones are served only on request.
    ready = {vid: v["p50_ms"]["1"] for vid, v in variants.items() if v["status"] == "ready"}
    ready_fp32 = {vid: p50 for vid, p50 in ready.items() if variants[vid]["precision"] == "fp32"}
    raw = mlflow.pyfunc.load_model(f"models:/{name}/1").get_raw_model()
    _assert_fastest_or_tied(raw, min(ready_fp32, key=ready_fp32.get))
    anything = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"precision": "any"})
    _assert_fastest_or_tied(anything.get_raw_model(), min(ready, key=ready.get))
    for vid in ready:  # every ready variant loads and predicts correctly when forced
        forced = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"variant": vid})
        x = models.examples(batch=3, seed=5)[kind]
        tol = {"int8": 0.2, "bf16": 5e-2}.get(variants[vid]["precision"], 1e-3)
        np.testing.assert_allclose(forced.predict(x), models.eager_outputs(model, x)[0], atol=tol, rtol=tol)


def _assert_fastest_or_tied(raw, fastest_id: str) -> None:
    """The loaded variant is the fastest, or ties with it within the noise and says so."""
    if raw.variant.id == fastest_id:
        return
    records = {v.id: v.benchmark_for(raw.decision.host_class) for v in raw.variants}
    chosen, fastest = records[raw.variant.id], records[fastest_id]
    band = tie_band(chosen.noise(1), fastest.noise(1))
    assert chosen.p50(1) <= fastest.p50(1) * (1 + band), raw.explain()
    assert f"ties with {fastest_id}" in raw.explain()


@pytest.mark.slow
def test_compiler_provenance_is_recorded(everything, tmp_path):
    _, info, _, _, name = everything
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path))
    variants, _ = read_variants(local, info.flavors["chimera"])
    by_backend = {v.backend: v for v in variants}
    aoti = by_backend["aotinductor"]
    assert aoti.requirements["arch"] == host_mod.fingerprint().arch
    assert aoti.requirements["cpu_flags"] and set(aoti.requirements["cpu_flags"]) <= set(host_mod.fingerprint().isa)
    assert aoti.requirements["packages"]["torch"] == ".".join(host_mod.fingerprint().packages["torch"].split(".")[:2])
    assert aoti.provenance["vec_isa"].startswith("Vec")
    compiled = by_backend["torch_compile"]
    assert compiled.provenance["cold_start_seconds"] > 0 and compiled.provenance["load_seconds"] > 0
    assert "compile_cache.bin" in compiled.files
    assert set(compiled.provenance) >= {"triton_version", "device", "compile_options"}


@pytest.mark.slow  # builds an AOTInductor variant (~12 s)
def test_aotinductor_for_another_isa_or_torch_is_rejected_with_the_reason(logged, tmp_path):
    info, _, _, name = logged.get("mlp", backends=["aotinductor"], precisions=["fp32"])
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path))
    variants, _ = read_variants(local, info.flavors["chimera"])
    (aoti,) = variants
    here = host_mod.fingerprint()
    assert rank(variants, here).candidates[0].variant.id == aoti.id

    older_cpu = dataclasses.replace(here, isa=("avx", "sse4_2"))
    decision = rank(variants, older_cpu)
    assert decision.candidates == []
    reason = decision.rejected[aoti.id]
    assert "this CPU lacks" in reason and aoti.requirements["cpu_flags"][0] in reason
    assert f"{aoti.id}: compiled for {aoti.options['vec_isa']}" in decision.explain()

    other_torch = dataclasses.replace(here, packages={**here.packages, "torch": "2.12.1"})
    reason = rank(variants, other_torch).rejected[aoti.id]
    assert "this host has torch 2.12.1 (must match major.minor)" in reason

    arm = dataclasses.replace(here, arch="aarch64")
    assert "this host is aarch64" in rank(variants, arm).rejected[aoti.id]


@pytest.mark.slow  # times every variant again
def test_benchmark_on_this_host_is_stored_and_used_for_ranking(logged, tmp_path):
    info, _, _, name = logged.get("mlp")
    result = mlflow_chimera_benchmark(f"models:/{name}/1")
    assert result["host_class"] == host_mod.fingerprint().host_class
    assert set(result["variants"]) == {vid for vid, v in info.flavors["chimera"]["variants"].items()
                                       if v["status"] == "ready"}
    for entry in result["variants"].values():
        assert entry["latency_ms"]["1"]["p50"] > 0
    # Stored with the logged model: a fresh download carries it, and selection ranks by it.
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path))
    variants, _ = read_variants(local, info.flavors["chimera"])
    fastest = min(result["variants"], key=lambda v: result["variants"][v]["latency_ms"]["1"]["p50"])
    decision = rank(variants, host_mod.fingerprint())
    assert decision.candidates[0].variant.id == fastest
    bench = decision.candidates[0].variant.benchmark_for(host_mod.fingerprint().host_class)
    assert bench.tool == "chimera.benchmark"
    # Only batch 1 was measured: the log-time figure at the example's batch is not kept beside
    # it, since figures from two measurements are never mixed in one record.
    assert bench.latency_ms == result["variants"][fastest]["latency_ms"]
    assert set(bench.latency_ms) == {"1"}


def mlflow_chimera_benchmark(uri):
    import mlflow_chimera

    return mlflow_chimera.benchmark(uri, batches=[1], timing={"max_seconds": 0.1})
