"""The parity gate: error measurement, NaN/Inf, shapes, and a forced failure end to end."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

import models
from mlflow_chimera.compile.parity import case_inputs, check_cases, compare_outputs, make_inputs, tolerance_for

TOL = {"atol": 1e-4, "rtol": 1e-3}


def test_element_passes_on_either_tolerance():
    ref = [np.array([1000.0, 0.0], dtype=np.float32)]
    ok = compare_outputs(ref, [np.array([1000.5, 5e-5], dtype=np.float32)], ["y"], TOL)[0]
    assert ok["passed"] and ok["max_abs"] == pytest.approx(0.5)
    bad = compare_outputs(ref, [np.array([1002.0, 0.0], dtype=np.float32)], ["y"], TOL)[0]
    assert not bad["passed"] and "outside atol" in bad["reason"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_always_fail(value):
    result = compare_outputs([np.zeros(3, np.float32)], [np.array([0, value, 0], np.float32)], ["y"],
                             {"atol": 1e9, "rtol": 1e9})[0]
    assert not result["passed"] and "NaN/Inf" in result["reason"]


def test_wrong_shape_fails():
    result = compare_outputs([np.zeros((4, 2))], [np.zeros((1, 2))], ["y"], TOL)[0]
    assert not result["passed"] and "shape [1, 2]" in result["reason"]


def test_tolerance_defaults_and_overrides():
    assert tolerance_for("fp32") == {"atol": 1e-4, "rtol": 1e-3}
    assert tolerance_for("int8")["atol"] > tolerance_for("fp16")["atol"] > tolerance_for("fp32")["atol"]
    assert tolerance_for("fp32", {"fp32": {"atol": 1e-6}}) == {"atol": 1e-6, "rtol": 1e-3}


def test_generated_check_inputs_differ_from_the_example_in_values():
    rng = np.random.default_rng(0)
    example = {"x": (3.0 + 0.5 * rng.standard_normal((2, 3))).astype(np.float32),
               "ids": np.array([[1, 2, 9], [3, 4, 7]], dtype=np.int64),
               "mask": np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)}
    big = make_inputs(example, 64)
    assert big["x"].shape == (64, 3) and big["x"].dtype == np.float32
    assert len({tuple(r) for r in big["x"].round(6)}) == 64  # not copies of the example rows
    assert abs(big["x"].mean() - 3.0) < 0.5  # the example's mean and spread
    assert big["ids"].dtype == np.int64 and set(big["ids"].ravel()) <= set(range(1, 10))
    assert len(set(big["ids"].ravel())) > 6  # the whole range, not just the example's values
    assert {tuple(r) for r in big["mask"]} <= {(1, 1, 1), (1, 1, 0)}  # masks keep their structure
    same_batch = make_inputs(example, 2)
    assert not np.array_equal(same_batch["x"], example["x"])


def test_check_cases_cover_generated_inputs_and_boundary_batches():
    labels = [(c["label"], c["batch"]) for c in check_cases(4)]
    assert labels == [("batch_1", 1), ("example", 4), ("generated", 4), ("batch_16", 16)]
    assert check_cases(4, {"ids": {"1": "sequence"}})[-1]["label"] == "shorter_axes"
    example = {"ids": np.arange(32, dtype=np.int64).reshape(2, 16)}
    shorter = case_inputs(example, {"label": "shorter_axes", "batch": 2}, {"ids": {"1": "sequence"}})
    assert shorter["ids"].shape == (2, 8)
    assert case_inputs(example, {"label": "example", "batch": 2}) is example


@pytest.mark.slow  # logs a model of its own
def test_forced_parity_failure_is_recorded_and_never_selected(tracking_uri):
    model = models.mlp()
    info = mlflow.chimera.log_model(
        model, name="strict", input_example=models.examples()["mlp"], precisions=["fp32"],
        backends=["onnxruntime", "eager"],
        # Zero tolerance: ONNX Runtime's float reassociation differs from eager torch in the
        # last bits, so every ONNX Runtime variant must fail; the eager reference is exact.
        tolerances={"fp32": {"atol": 0.0, "rtol": 0.0}},
    )
    variants = info.flavors["chimera"]["variants"]
    for vid in ("onnxruntime-fp32-cpu", "onnxruntime-fp32-cpu-noopt"):
        assert variants[vid]["status"] == "failed_parity"
        assert "outside atol=0" in variants[vid]["reason"]
        assert variants[vid]["parity_max_abs"] > 0
    assert variants["eager-fp32-cpu"]["status"] == "ready"
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    raw = loaded.get_raw_model()
    assert raw.variant.id == "eager-fp32-cpu"
    assert "onnxruntime-fp32-cpu: failed parity" in raw.explain()
    forced = mlflow.pyfunc.load_model(info.model_uri, model_config={"variant": "onnxruntime-fp32-cpu"})
    assert forced.get_raw_model().variant.id == "onnxruntime-fp32-cpu"
