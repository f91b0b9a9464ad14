"""Input handling of the pyfunc: accepted forms, clear errors for bad input, thread safety."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

import models


@pytest.fixture(scope="module")
def mlp(logged):
    _, model, _, name = logged.get("mlp")
    return mlflow.pyfunc.load_model(f"models:/{name}/1"), model


@pytest.fixture(scope="module")
def two(logged):
    _, model, _, name = logged.get("two_in_two_out")
    return mlflow.pyfunc.load_model(f"models:/{name}/1"), model


def test_dataframe_and_array_give_the_same_answer(mlp):
    loaded, _ = mlp
    x = models.examples(batch=5)["mlp"]
    np.testing.assert_array_equal(loaded.predict(pd.DataFrame(x)), loaded.predict(x))


def test_named_inputs_as_dict_and_dataframe(two):
    loaded, model = two
    ex = models.examples(batch=3)["two_in_two_out"]
    expected = models.eager_outputs(model, ex)
    by_dict = loaded.predict(ex)
    df = pd.DataFrame({"features": list(ex["features"]), "context": list(ex["context"])})
    by_frame = loaded.predict(df)
    for name, e in zip(["score", "embedding"], expected):
        np.testing.assert_allclose(by_dict[name], e, atol=0.15)
        np.testing.assert_array_equal(by_frame[name], by_dict[name])


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((2, 63), np.float32), "shape"),
    (np.zeros((2, 64, 1), np.float32), "shape"),
    (np.array([["a"] * 64]), "dtype|type"),
])
def test_bad_single_input_names_the_problem(mlp, bad, pattern):
    loaded, _ = mlp
    with pytest.raises(MlflowException, match=pattern) as err:
        loaded.predict(bad)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_missing_named_input_names_it_and_the_spec(two):
    loaded, _ = two
    ex = models.examples()["two_in_two_out"]
    with pytest.raises(MlflowException, match="context") as err:
        loaded.predict({"features": ex["features"]})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_raw_model_errors_name_input_and_spec(two, mlp):
    raw = two[0].get_raw_model()
    ex = models.examples()["two_in_two_out"]
    with pytest.raises(ValueError, match=r"missing input\(s\) \['context'\].*features: float32\[batch, 8\]"):
        raw.predict({"features": ex["features"]})
    with pytest.raises(ValueError, match=r"input 'context' has shape \[2, 5\], expected context: float32\[batch, 6\]"):
        raw.predict({"features": ex["features"], "context": np.zeros((2, 5), np.float32)})
    with pytest.raises(ValueError, match="different batch sizes"):
        raw.predict({"features": ex["features"], "context": np.zeros((3, 6), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected input\(s\) \['extra'\]"):
        raw.predict({**ex, "extra": ex["features"]})
    with pytest.raises(ValueError, match="dtype <U1"):
        mlp[0].get_raw_model().predict(np.array([["a"] * 64]))
    # Safe casts are accepted: float64 and Python lists become float32.
    x = models.examples()["mlp"]
    np.testing.assert_array_equal(mlp[0].get_raw_model().predict(x.astype(np.float64).tolist()),
                                  mlp[0].get_raw_model().predict(x))


def test_predict_is_safe_from_many_threads(mlp, two):
    loaded, model = mlp
    batches = [models.examples(batch=1 + i % 5, seed=i)["mlp"] for i in range(64)]
    expected = [loaded.predict(b) for b in batches]  # same variant, computed serially
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(loaded.predict, batches))
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_a_dynamic_axis_without_an_upper_bound_is_captured():
    """A model whose sequence length has no limit (no position table): torch.export reports the
    axis as unbounded (``int_oo``), which capture used to fail on for every backend."""
    import torch

    from mlflow_chimera.capture import capture
    from mlflow_chimera.reference import MAX_BATCH

    class MeanEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)

        def forward(self, input_ids):
            return self.embed(input_ids).mean(1)

    ids = np.random.default_rng(0).integers(0, 100, (2, 7)).astype(np.int64)
    captured = capture(MeanEmbedding().eval(), {"input_ids": ids}, {"input_ids": {1: "sequence"}})
    assert captured.signature.axis_ranges == {"sequence": [2, MAX_BATCH]}
    assert captured.signature.dynamic_axes == {"input_ids": {"1": "sequence"}}
