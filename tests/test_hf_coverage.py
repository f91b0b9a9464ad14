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


@pytest.mark.slow  # ~10 s: logs a transformers model
def test_dynamic_sequence_axis_serves_other_lengths_within_the_models_range(tracking_uri):
    import mlflow
    import numpy as np
    import torch
    from mlflow.exceptions import MlflowException

    spec = hf_models.ARCHITECTURES["bert"]
    model = spec.build()
    example = spec.example()
    example["attention_mask"] = example["attention_mask"].astype(bool)  # a bool mask, as some users pass it
    info = mlflow.chimera.log_model(model, name="bert-dynamic-seq", input_example=example,
                                    backends=["onnxruntime", "eager"], precisions=["fp32"],
                                    dynamic_shapes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}})
    signature = info.flavors["chimera"]["signature"]
    assert signature["dynamic_axes"] == {"input_ids": {"1": "sequence"}, "attention_mask": {"1": "sequence"}}
    low, high = signature["axis_ranges"]["sequence"]
    assert low <= 5 and high == model.config.max_position_embeddings
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.get_raw_model().variant.backend == "onnxruntime"
    shorter = {k: v[:, :5] for k, v in spec.example(batch=3, seed=4).items()}
    shorter["attention_mask"] = shorter["attention_mask"].astype(bool)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in shorter.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(loaded.predict(shorter)["last_hidden_state"], expected, atol=1e-4)
    too_long = {k: np.resize(v, (1, high + 1)) for k, v in shorter.items()}
    with pytest.raises(MlflowException, match=f"dynamic axis 'sequence' has size {high + 1}; the model takes"):
        loaded.predict(too_long)
