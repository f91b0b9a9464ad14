"""log_model never reports success with nothing usable: the cause is named, the run and the
logged model end FAILED, and no model version is registered."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import models
from mlflow_chimera.errors import ChimeraError


class NaNOutput(torch.nn.Module):
    def forward(self, x):
        return torch.log(x - 10.0)  # NaN for every input below 10


class RandomForward(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


CASES = {
    "nan": (NaNOutput, None, r"eager model's output 'output' has \d+ NaN/Inf"),
    "random": (RandomForward, None, r"non-deterministic forward"),
    "raising": (models.mlp, ["faulty_backends:Raising"], r"raising-fp32-cpu: build_failed: .*aten::frobnicate"),
    "segfault": (models.mlp, ["faulty_backends:Crashing"], r"crashing-fp32-cpu: build_failed: build process "
                                                           r"killed by signal SIGSEGV"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_model_raises_and_leaves_nothing_ready(case, tracking_uri):
    build, backends, cause = CASES[case]
    name = f"unusable-{case}"
    example = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ChimeraError, match=cause):
        mlflow.chimera.log_model(build(), name=name, input_example=example, registered_model_name=name,
                                 backends=backends, precisions=["fp32"])
    client = MlflowClient()
    runs = mlflow.search_runs(filter_string=f"attributes.run_name = '{name}'", search_all_experiments=True,
                              output_format="list")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    logged = client.search_logged_models(experiment_ids=[runs[0].info.experiment_id],
                                         filter_string=f"name = '{name}'")
    assert all(str(m.status).endswith("FAILED") for m in logged)
    assert client.search_model_versions(f"name = '{name}'") == []
    assert mlflow.active_run() is None
