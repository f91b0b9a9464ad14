"""`mlflow models serve` end to end: a real uvicorn scoring server per model, on 127.0.0.1.

Each server is a subprocess started with the venv's ``bin`` on ``PATH`` (MLflow execs
``uvicorn`` by name) and the session's sqlite tracking store, so ``models:/<name>/1`` resolves
exactly as it does for a user. Server predictions are compared with the same model loaded
in-process (same host, so the same variant is selected) at 1e-5, and loosely with the eager
model.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

import numpy as np
import pytest
import requests

import models
import servers

pytestmark = [pytest.mark.serve, pytest.mark.slow]  # every test here starts a server

STARTUP_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 30
CLOSE = 1e-5  # server vs the same model loaded in-process
LOOSE = 0.1  # vs eager: the chosen variant may be int8


# -- the server ---------------------------------------------------------------------------


class Server(servers.ServerProcess):
    """A running `mlflow models serve`."""

    def invoke(self, payload: dict) -> requests.Response:
        return requests.post(f"{self.url}/invocations", json=payload, timeout=REQUEST_TIMEOUT_S)

    def predict(self, payload: dict):
        resp = self.invoke(payload)
        assert resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text}"
        return resp.json()["predictions"]

    def loaded_variant(self) -> str:
        found = re.findall(r"chimera: loaded variant (\S+)", self.output())
        assert len(found) == 1, f"expected one 'loaded variant' line:\n{self.output()}"
        return found[0]


@contextlib.contextmanager
def serve(model_uri: str, tracking_uri: str, extra_env: dict | None = None):
    """Start `mlflow models serve` for ``model_uri``, wait for /ping, always stop it."""
    env = servers.venv_env({"MLFLOW_TRACKING_URI": tracking_uri, **(extra_env or {})})
    for key in ("SERVING_MODEL_CONFIG", "MLFLOW_PYFUNC_INFERENCE_CONFIG"):
        if key not in (extra_env or {}):
            env.pop(key, None)
    port = servers.free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with servers.running(cmd, port, "/ping", env, f"server for {model_uri}", STARTUP_TIMEOUT_S) as proc:
        yield Server(proc.proc, proc.url, proc.log_path)


# -- fixtures -----------------------------------------------------------------------------


class Served:
    """A running server plus the same model loaded in-process, for comparison."""

    def __init__(self, server, local, torch_model, example, name):
        self.server = server
        self.local = local
        self.torch_model = torch_model
        self.example = example
        self.name = name


@pytest.fixture(scope="module")
def mlp_served(logged, tracking_uri):
    import mlflow

    info, torch_model, example, name = logged.get("mlp")
    local = mlflow.pyfunc.load_model(f"models:/{name}/1")
    with serve(f"models:/{name}/1", tracking_uri) as server:
        yield Served(server, local, torch_model, example, name)


@pytest.fixture(scope="module")
def two_served(logged, tracking_uri):
    import mlflow

    info, torch_model, example, name = logged.get("two_in_two_out")
    local = mlflow.pyfunc.load_model(f"models:/{name}/1")
    with serve(f"models:/{name}/1", tracking_uri) as server:
        yield Served(server, local, torch_model, example, name)


def _batch(kind: str, n: int = 3):
    """A batch other than the logged example (different seed and size)."""
    return models.examples(batch=n, seed=7)[kind]


def _as_f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


# -- single input (mlp) -------------------------------------------------------------------


def test_mlp_server_loads_the_variant_selected_in_process(mlp_served):
    assert mlp_served.server.loaded_variant() == mlp_served.local.get_raw_model().variant.id


@pytest.mark.parametrize("fmt", ["inputs", "instances", "dataframe_split"])
def test_mlp_predictions(mlp_served, fmt):
    x = _batch("mlp")
    if fmt == "dataframe_split":
        payload = {"dataframe_split": {"columns": [f"c{i}" for i in range(x.shape[1])], "data": x.tolist()}}
    else:
        payload = {fmt: x.tolist()}
    got = _as_f32(mlp_served.server.predict(payload))

    expected_local = mlp_served.local.predict(x)
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected_local, rtol=0, atol=CLOSE)
    (expected_eager,) = models.eager_outputs(mlp_served.torch_model, x)
    np.testing.assert_allclose(got, expected_eager, rtol=0, atol=LOOSE)


def test_mlp_bad_inputs_are_4xx_and_the_server_keeps_serving(mlp_served):
    server = mlp_served.server
    x = _batch("mlp", 2)

    wrong_shape = server.invoke({"inputs": x[:, :63].tolist()})
    assert 400 <= wrong_shape.status_code < 500, wrong_shape.text
    assert "(-1, 64)" in wrong_shape.json()["message"], wrong_shape.text  # the expected spec

    rows = x.tolist()
    rows[0][5] = "not a number"
    string = server.invoke({"inputs": rows})
    assert 400 <= string.status_code < 500, string.text
    assert "not a number" in string.json()["message"], string.text

    got = _as_f32(server.predict({"inputs": x.tolist()}))
    np.testing.assert_allclose(got, mlp_served.local.predict(x), rtol=0, atol=CLOSE)
    assert server.proc.poll() is None


# -- two inputs, two outputs ----------------------------------------------------------------


def _two_payload(fmt: str, batch: dict) -> dict:
    features, context = batch["features"], batch["context"]
    if fmt == "inputs":
        return {"inputs": {"features": features.tolist(), "context": context.tolist()}}
    if fmt == "instances":
        return {"instances": [{"features": f.tolist(), "context": c.tolist()}
                              for f, c in zip(features, context)]}
    if fmt == "dataframe_split":
        return {"dataframe_split": {"columns": ["features", "context"],
                                    "data": [[f.tolist(), c.tolist()] for f, c in zip(features, context)]}}
    raise ValueError(fmt)


def test_two_input_server_loads_the_variant_selected_in_process(two_served):
    assert two_served.server.loaded_variant() == two_served.local.get_raw_model().variant.id


@pytest.mark.parametrize("fmt", ["inputs", "instances", "dataframe_split"])
def test_two_input_predictions(two_served, fmt):
    batch = _batch("two_in_two_out")
    got = two_served.server.predict(_two_payload(fmt, batch))

    assert isinstance(got, dict) and set(got) == {"score", "embedding"}, got
    local = two_served.local.predict(batch)
    eager = dict(zip(["score", "embedding"], models.eager_outputs(two_served.torch_model, batch)))
    for name, shape in (("score", (3, 1)), ("embedding", (3, 4))):
        arr = _as_f32(got[name])
        assert arr.shape == shape, (name, arr.shape)
        np.testing.assert_allclose(arr, local[name], rtol=0, atol=CLOSE, err_msg=name)
        np.testing.assert_allclose(arr, eager[name], rtol=0, atol=LOOSE, err_msg=name)


def test_two_input_bad_inputs_name_the_input(two_served):
    server = two_served.server
    batch = _batch("two_in_two_out", 2)
    features, context = batch["features"].tolist(), batch["context"].tolist()

    wrong_shape = server.invoke({"inputs": {"features": [r[:7] for r in features], "context": context}})
    assert 400 <= wrong_shape.status_code < 500, wrong_shape.text
    message = wrong_shape.json()["message"]
    assert "'features'" in message and "(-1, 8)" in message, message

    missing = server.invoke({"inputs": {"features": features}})
    assert 400 <= missing.status_code < 500, missing.text
    assert "context" in missing.json()["message"], missing.text

    bad_context = [list(r) for r in context]
    bad_context[1][2] = "oops"
    string = server.invoke({"inputs": {"features": features, "context": bad_context}})
    assert 400 <= string.status_code < 500, string.text
    assert "oops" in string.json()["message"], string.text

    got = server.predict(_two_payload("inputs", batch))
    local = two_served.local.predict(batch)
    for name in ("score", "embedding"):
        np.testing.assert_allclose(_as_f32(got[name]), local[name], rtol=0, atol=CLOSE, err_msg=name)
    assert server.proc.poll() is None


def test_two_input_string_value_is_a_4xx_naming_the_value(two_served):
    # MLflow's scoring server casts JSON to the TensorSpec dtype before the model sees it, so
    # this message is MLflow's ("could not convert string to float: 'oops'") and does not name
    # the input; the server still answers 400 and keeps serving.
    batch = _batch("two_in_two_out", 2)
    bad_context = batch["context"].tolist()
    bad_context[1][2] = "oops"
    resp = two_served.server.invoke({"inputs": {"features": batch["features"].tolist(), "context": bad_context}})
    assert 400 <= resp.status_code < 500
    assert "oops" in resp.json()["message"], resp.text
    assert two_served.server.proc.poll() is None


# -- load-time config through SERVING_MODEL_CONFIG ------------------------------------------


def test_serving_model_config_forces_the_eager_backend(logged, tracking_uri):
    info, torch_model, example, name = logged.get("mlp")
    x = _batch("mlp")
    with serve(f"models:/{name}/1", tracking_uri,
               {"SERVING_MODEL_CONFIG": json.dumps({"backend": "eager"})}) as server:
        assert "loaded variant eager-fp32-cpu" in server.output(), server.output()
        assert server.loaded_variant() == "eager-fp32-cpu"
        got = _as_f32(server.predict({"inputs": x.tolist()}))
    (expected,) = models.eager_outputs(torch_model, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
