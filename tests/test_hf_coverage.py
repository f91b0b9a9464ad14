"""Hugging Face models as users hand them over: logged without a wrapper, loaded from the
registry in a fresh process, served on inputs they were not captured with, compared with the
eager model. Three architectures run in the fast tier; the rest are marked slow."""

from __future__ import annotations

import json
import os

import pytest

import hf_models
from benchmarks.coverage import FAST_BACKENDS, cover

CASES = [pytest.param(name, spec, id=name, marks=() if spec.fast else pytest.mark.slow)
         for name, spec in hf_models.ARCHITECTURES.items()]


@pytest.mark.parametrize("name, spec", CASES)
def test_architecture_logs_as_handed_over_and_serves_fresh_inputs(name, spec, tmp_path):
    row = cover(name, spec, FAST_BACKENDS, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                workdir=str(tmp_path))
    if os.environ.get("CHIMERA_COVERAGE_ROWS"):  # for `python -m benchmarks.coverage --rows`
        with open(os.environ["CHIMERA_COVERAGE_ROWS"], "a") as f:
            f.write(json.dumps(row) + "\n")
    assert row["ready_fp32_besides_eager"], f"only eager is ready: {row['failed']}"
    assert row["pick_precision"] == "fp32", row  # lossy variants only on request
    assert row["served_output_names"] == row["expected_output_names"]
    assert row["within_tolerance"], row


def test_model_is_handed_back_in_the_mode_it_came_in(tracking_uri):
    import mlflow

    spec = hf_models.ARCHITECTURES["bert"]
    model = spec.build().train()
    flags = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    mlflow.chimera.log_model(model, name="bert-train-mode", input_example=spec.example(),
                             backends=["eager"], precisions=["fp32"])
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
