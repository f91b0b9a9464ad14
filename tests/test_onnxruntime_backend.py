"""ONNX Runtime backend details: exporter choice and fallback, keyword inputs, active providers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import models
from mlflow_chimera.backends.base import LoadContext
from mlflow_chimera.backends.onnx_runtime import OnnxRuntimeBackend
from mlflow_chimera.manifest import Variant
from mlflow_chimera.reference import Signature
from mlflow_chimera.runtime import local_variant_dir


class KeywordOnly(torch.nn.Module):
    """One positional input and one keyword-only input."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x, *, scale):
        return self.fc(x) * scale


@pytest.mark.slow  # ~30 s: exports and builds a model of its own
def test_keyword_only_inputs_round_trip(tracking_uri):
    model = KeywordOnly().eval()
    rng = np.random.default_rng(0)
    example = {"x": rng.standard_normal((3, 4)).astype(np.float32),
               "scale": rng.standard_normal((3, 1)).astype(np.float32)}
    info = mlflow.chimera.log_model(model, name="kwonly", input_example=example, precisions=["fp32"])
    assert info.flavors["chimera"]["signature"]["n_positional"] == 0  # the program takes every input by name
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    with torch.no_grad():
        expected = model(torch.from_numpy(example["x"]), scale=torch.from_numpy(example["scale"])).numpy()
    for backend in ("onnxruntime", "eager"):
        got = mlflow.pyfunc.load_model(info.model_uri, model_config={"backend": backend}).predict(example)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert loaded.get_raw_model().variant.backend in ("onnxruntime", "eager")


def test_legacy_exporter_is_used_and_recorded_when_dynamo_fails(tracking_uri, tmp_path):
    model = models.mlp()
    info = mlflow.chimera.log_model(model, name="legacy", input_example=models.examples()["mlp"],
                                    backends=["faulty_backends:DynamoFailsOnnxRuntime"], precisions=["fp32"])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    prov = json.loads((local / "variants/onnxruntime-fp32-cpu/variant.json").read_text())["provenance"]
    assert prov["exporter"] == "legacy"
    assert "simulated dynamo exporter failure" in prov["exporter_fallback_reason"]
    assert info.flavors["chimera"]["variants"]["onnxruntime-fp32-cpu"]["status"] == "ready"
    x = models.examples(batch=5)["mlp"]
    np.testing.assert_allclose(mlflow.pyfunc.load_model(info.model_uri).predict(x),
                               models.eager_outputs(model, x)[0], atol=1e-4)


def test_a_provider_that_is_not_active_fails_the_load(logged, tmp_path):
    info, _, _, name = logged.get("mlp")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path)))
    variant = Variant.load(local / "variants/onnxruntime-fp32-cpu")
    vdir = local_variant_dir(variant, local)  # fetched from the run's artifacts, verified
    conf = info.flavors["chimera"]
    context = LoadContext(model_dir=local, signature=Signature.from_dict(conf["signature"]),
                          reference_sha256=conf["reference"]["sha256"])
    OnnxRuntimeBackend().load(variant, vdir, context)  # as recorded: loads
    variant.options["providers"] = ["CUDAExecutionProvider"]  # no CUDA on this host
    with pytest.raises(RuntimeError, match=r"\['CUDAExecutionProvider'\].*not active"):
        OnnxRuntimeBackend().load(variant, vdir, context)


def test_unknown_precision_fails_before_anything_is_logged(tracking_uri):
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ValueError, match="unknown precision.*fp64"):
        mlflow.chimera.log_model(models.mlp(), name="fp64", input_example=models.examples()["mlp"],
                                 precisions=["fp64"])
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
