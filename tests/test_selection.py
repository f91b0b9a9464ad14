"""Selection rules on Variant records (pure logic), and on a logged model (real runtimes)."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest

from fleet import assert_fastest_or_tied
from mlflow_chimera.host import HostFingerprint
from mlflow_chimera.manifest import BUILD_FAILED, FAILED_PARITY, READY, Benchmark, Parity, Variant
from mlflow_chimera.selection import rank

HOST = HostFingerprint(os="linux", arch="x86_64", cpu_model="Test CPU", cpu_count=2,
                       isa=("avx2",), packages={"onnxruntime": "1.32.0", "torch": "2.13.0"})
OTHER_CLASS = "linux-x86_64-some-other-cpu-64cpu"


def _variant(vid, backend="onnxruntime", precision="fp32", status=READY, p50=None, host_class=None,
             ort="1.32", noise=None, max_abs=None, load_seconds=None):
    benchmarks = []
    if p50 is not None:
        figures = {"p50": p50, "p90": p50, "p99": p50, "noise": noise}
        benchmarks = [Benchmark(host_class or HOST.host_class, {"1": figures})]
    checks = [] if max_abs is None else [{"case": "example", "batch": 2,
                                          "outputs": [{"name": "output", "max_abs": max_abs, "max_rel": max_abs}]}]
    return Variant(
        id=vid, backend=backend, precision=precision, target="cpu", status=status,
        reason=None if status == READY else "test reason",
        requirements={"packages": {"onnxruntime": ort}} if backend == "onnxruntime" else {},
        parity=Parity(passed=status == READY, tolerance={"atol": 1e-4, "rtol": 1e-3}, criterion="t",
                      checks=checks),
        benchmarks=benchmarks,
        provenance={} if load_seconds is None else {"load_seconds": load_seconds},
    )


def test_ranks_by_latency_measured_on_this_host_class():
    variants = [_variant("onnxruntime-fp32-cpu", p50=0.30), _variant("onnxruntime-int8-cpu", precision="int8", p50=0.10),
                _variant("eager-fp32-cpu", backend="eager", p50=0.20)]
    decision = rank(variants, HOST, {"precision": "any"})
    assert [c.variant.id for c in decision.candidates] == ["onnxruntime-int8-cpu", "eager-fp32-cpu", "onnxruntime-fp32-cpu"]
    assert "measured on this host class" in decision.candidates[0].basis


def test_lossy_variants_are_served_only_on_request():
    variants = [_variant("onnxruntime-fp32-cpu", p50=0.30), _variant("onnxruntime-int8-cpu", precision="int8", p50=0.10),
                _variant("onnxruntime-bf16-cpu", precision="bf16", p50=0.05)]
    default = rank(variants, HOST)
    assert [c.variant.id for c in default.candidates] == ["onnxruntime-fp32-cpu"]
    assert "lossy: int8 is served only on request" in default.rejected["onnxruntime-int8-cpu"]
    assert [c.variant.id for c in rank(variants, HOST, {"precision": "int8"}).candidates] == ["onnxruntime-int8-cpu"]
    both = rank(variants, HOST, {"precision": "fp32,bf16"})
    assert [c.variant.id for c in both.candidates] == ["onnxruntime-bf16-cpu", "onnxruntime-fp32-cpu"]
    with pytest.raises(ValueError, match="'fp64'.*not a precision"):
        rank(variants, HOST, {"precision": "fp64"})


def test_timings_from_another_host_class_are_not_compared():
    variants = [_variant("eager-fp32-cpu", backend="eager", p50=0.01, host_class=OTHER_CLASS),
                _variant("onnxruntime-fp32-cpu", p50=0.5, host_class=OTHER_CLASS)]
    decision = rank(variants, HOST)
    # Neither was measured here: the documented default order puts ONNX Runtime first.
    assert [c.variant.id for c in decision.candidates] == ["onnxruntime-fp32-cpu", "eager-fp32-cpu"]
    assert all("default order" in c.basis for c in decision.candidates)


def test_measured_candidates_come_before_unmeasured_ones():
    variants = [_variant("onnxruntime-fp32-cpu"), _variant("eager-fp32-cpu", backend="eager", p50=1.0)]
    assert [c.variant.id for c in rank(variants, HOST).candidates] == ["eager-fp32-cpu", "onnxruntime-fp32-cpu"]


def test_failed_variants_are_never_candidates_but_can_be_forced():
    variants = [_variant("onnxruntime-fp32-cpu", status=FAILED_PARITY, p50=0.01),
                _variant("onnxruntime-int8-cpu", precision="int8", status=BUILD_FAILED),
                _variant("eager-fp32-cpu", backend="eager", p50=1.0)]
    decision = rank(variants, HOST)
    assert [c.variant.id for c in decision.candidates] == ["eager-fp32-cpu"]
    assert decision.rejected["onnxruntime-fp32-cpu"].startswith("failed parity")
    assert decision.rejected["onnxruntime-int8-cpu"].startswith("build failed")
    forced = rank(variants, HOST, {"variant": "onnxruntime-fp32-cpu"})
    assert [c.variant.id for c in forced.candidates] == ["onnxruntime-fp32-cpu"]
    assert "forces" in forced.rejected["eager-fp32-cpu"]


def test_backend_and_precision_overrides():
    variants = [_variant("onnxruntime-int8-cpu", precision="int8", p50=0.1), _variant("onnxruntime-fp32-cpu", p50=0.2),
                _variant("eager-fp32-cpu", backend="eager", p50=0.3)]
    assert [c.variant.id for c in rank(variants, HOST, {"backend": "eager"}).candidates] == ["eager-fp32-cpu"]
    assert [c.variant.id for c in rank(variants, HOST, {"precision": "fp32"}).candidates] == [
        "onnxruntime-fp32-cpu", "eager-fp32-cpu"]
    assert len(rank(variants, HOST, {"backend": "auto", "variant": "auto"}).candidates) == 2  # fp32 only
    assert len(rank(variants, HOST, {"backend": "auto", "precision": "any"}).candidates) == 3


def test_unknown_override_values_are_clear_errors():
    variants = [_variant("onnxruntime-fp32-cpu")]
    with pytest.raises(ValueError, match="variant 'nope' is not in this model.*onnxruntime-fp32-cpu"):
        rank(variants, HOST, {"variant": "nope"})
    with pytest.raises(ValueError, match="backend 'tensorrt' has no variant"):
        rank(variants, HOST, {"backend": "tensorrt"})


def test_host_without_the_runtime_rejects_with_reason():
    bare = dataclasses.replace(HOST, packages={})
    decision = rank([_variant("onnxruntime-fp32-cpu"), _variant("eager-fp32-cpu", backend="eager")], bare)
    assert decision.candidates == []
    assert decision.rejected["onnxruntime-fp32-cpu"] == "onnxruntime is not installed on this host"
    assert decision.rejected["eager-fp32-cpu"] == "torch is not installed on this host"
    older = dataclasses.replace(HOST, packages={"onnxruntime": "1.20.1"})
    assert "older than 1.32" in rank([_variant("onnxruntime-fp32-cpu")], older).rejected["onnxruntime-fp32-cpu"]


def test_logged_model_loads_the_fastest_variant_measured_at_log_time(logged):
    info, _, _, name = logged.get("cnn")
    variants = info.flavors["chimera"]["variants"]
    ready = {vid: e["p50_ms"]["1"] for vid, e in variants.items()
             if e["status"] == "ready" and e["precision"] == "fp32"}  # lossy ones only on request
    raw = mlflow.pyfunc.load_model(f"models:/{name}/1").get_raw_model()
    assert_fastest_or_tied(raw.variant.id, raw.explain(), ready)
    explanation = raw.explain()
    assert f"chosen: {raw.variant.id}" in explanation
    for vid in variants:
        assert vid in explanation


def test_model_config_forces_a_variant_at_load(logged):
    _, model, example, name = logged.get("mlp")
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"variant": "eager-fp32-cpu"})
    assert loaded.get_raw_model().variant.id == "eager-fp32-cpu"
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"backend": "onnxruntime", "precision": "fp32"})
    assert loaded.get_raw_model().variant.id.startswith("onnxruntime-fp32")
    with pytest.raises(mlflow.exceptions.MlflowException, match="variant 'nope' is not in this model"):
        mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"variant": "nope"})


def test_figures_within_measurement_noise_are_a_tie_won_by_the_variant_cheaper_to_load():
    # eager is 3 % faster, but both figures carry 4 % noise: a tie, and ONNX Runtime needs no torch.
    variants = [_variant("eager-fp32-cpu", backend="eager", p50=0.097, noise=0.04),
                _variant("onnxruntime-fp32-cpu", p50=0.100, noise=0.04, load_seconds=0.5)]
    decision = rank(variants, HOST)
    assert [c.variant.id for c in decision.candidates] == ["onnxruntime-fp32-cpu", "eager-fp32-cpu"]
    assert "ties with eager-fp32-cpu" in decision.candidates[0].basis
    assert "needs no torch" in decision.candidates[0].basis
    # Measured apart by more than the noise: the faster one wins whatever it costs to load.
    quiet = [_variant("eager-fp32-cpu", backend="eager", p50=0.090, noise=0.01),
             _variant("onnxruntime-fp32-cpu", p50=0.100, noise=0.01)]
    assert rank(quiet, HOST).candidates[0].variant.id == "eager-fp32-cpu"
    # Among variants of one runtime, the one that loaded faster wins a tie.
    same = [_variant("onnxruntime-fp32-cpu", p50=0.100, noise=0.05, load_seconds=0.9),
            _variant("onnxruntime-fp32-cpu-noopt", p50=0.101, noise=0.05, load_seconds=0.2)]
    decision = rank(same, HOST)
    assert decision.candidates[0].variant.id == "onnxruntime-fp32-cpu-noopt"
    assert "loads faster" in decision.candidates[0].basis
    # However noisy the figures, one more than 5 % slower is never a tie.
    noisy = [_variant("eager-fp32-cpu", backend="eager", p50=0.090, noise=0.2),
             _variant("onnxruntime-fp32-cpu", p50=0.100, noise=0.2)]
    assert rank(noisy, HOST).candidates[0].variant.id == "eager-fp32-cpu"
    # Records without a noise figure (older chimera) rank by p50 alone.
    old = [_variant("eager-fp32-cpu", backend="eager", p50=0.099), _variant("onnxruntime-fp32-cpu", p50=0.100)]
    assert rank(old, HOST).candidates[0].variant.id == "eager-fp32-cpu"


def test_opting_in_to_lower_accuracy_by_error_bound_or_any():
    variants = [_variant("onnxruntime-fp32-cpu", p50=0.30, max_abs=2e-6),
                _variant("onnxruntime-int8-cpu", precision="int8", p50=0.10, max_abs=2.7e-2),
                _variant("onnxruntime-bf16-cpu", precision="bf16", p50=0.15, max_abs=8e-3)]
    by_bound = rank(variants, HOST, {"max_abs_err": 1e-2})
    assert [c.variant.id for c in by_bound.candidates] == ["onnxruntime-bf16-cpu", "onnxruntime-fp32-cpu"]
    assert "above model_config max_abs_err 0.01" in by_bound.rejected["onnxruntime-int8-cpu"]
    assert rank(variants, HOST, {"max_abs_err": "1e-2"}).candidates[0].variant.id == "onnxruntime-bf16-cpu"
    assert rank(variants, HOST, {"accuracy": "any"}).candidates[0].variant.id == "onnxruntime-int8-cpu"
    with pytest.raises(ValueError, match="max_abs_err 'tight' is not a positive number"):
        rank(variants, HOST, {"max_abs_err": "tight"})
    with pytest.raises(ValueError, match="accuracy 'high' is not understood"):
        rank(variants, HOST, {"accuracy": "high"})


def test_explain_says_what_each_opt_in_would_gain():
    variants = [_variant("onnxruntime-fp32-cpu", p50=0.30, max_abs=2e-6),
                _variant("onnxruntime-int8-cpu", precision="int8", p50=0.10, max_abs=2.7e-2),
                _variant("onnxruntime-bf16-cpu", precision="bf16", p50=0.60, max_abs=8e-3)]
    decision = rank(variants, HOST)
    decision.chosen = decision.candidates[0].variant
    text = decision.explain()
    assert "faster with lower accuracy" in text
    assert ("onnxruntime-int8-cpu (int8): 3.0x faster than the pick, max abs err 0.03; "
            "opt in with model_config={'precision': 'int8'}") in text
    assert "onnxruntime-bf16-cpu (bf16)" not in text.split("faster with lower accuracy")[1]  # slower: no gain
    # Once opted in, nothing faster is left out.
    assert "faster with lower accuracy" not in rank(variants, HOST, {"precision": "any"}).explain()
