"""Dynamic batching: concurrent predict calls merged into one run, each caller getting exactly
its own rows; malformed input fails alone; through a real `mlflow models serve` too."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import requests
from mlflow.exceptions import MlflowException

import models
import servers
from mlflow_chimera.batching import BatchingConfig, DynamicBatcher

BATCHING = {"max_batch_size": 32, "max_delay_ms": 20}
# The batcher sits above the runner; each kind of runner is checked under it.
BACKENDS = ["onnxruntime", "openvino", "eager"]


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("batching") / "mlp"
    mlflow.chimera.save_model(models.mlp(), str(path), input_example=models.examples()["mlp"],
                              backends=BACKENDS, precisions=["fp32"])
    return path


def _requests(n: int) -> list:
    """n inputs of batch sizes 1 to 5, each different."""
    return [models.examples(batch=1 + i % 5, seed=100 + i)["mlp"] for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_callers_are_merged_and_each_gets_its_own_rows(mlp_path, backend):
    plain = mlflow.pyfunc.load_model(str(mlp_path), model_config={"backend": backend})
    batched = mlflow.pyfunc.load_model(str(mlp_path), model_config={"backend": backend, "batching": BATCHING})
    assert batched.get_raw_model().variant.backend == backend
    inputs = _requests(24)
    start = threading.Barrier(24)

    def call(x):
        start.wait()
        return batched.predict(x)

    with ThreadPoolExecutor(24) as pool:
        answers = [f.result(timeout=60) for f in [pool.submit(call, x) for x in inputs]]
    for x, answer in zip(inputs, answers):
        assert answer.shape == (x.shape[0], 10)
        np.testing.assert_allclose(answer, plain.predict(x), atol=1e-5, rtol=1e-5)
    batcher = batched.get_raw_model().batcher
    assert batcher.config == BatchingConfig(32, 20.0)
    assert batcher.batches_run < len(inputs)  # requests were merged, not run one by one


def test_a_malformed_request_fails_alone(mlp_path):
    batched = mlflow.pyfunc.load_model(str(mlp_path), model_config={"batching": BATCHING})
    good = _requests(8)
    bad = np.zeros((2, 63), dtype=np.float32)  # one feature short
    start = threading.Barrier(9)

    def call(x):
        start.wait()
        try:
            return batched.predict(x)
        except MlflowException as exc:
            return exc

    with ThreadPoolExecutor(9) as pool:
        answers = [f.result(timeout=60) for f in [pool.submit(call, x) for x in good + [bad]]]
    assert isinstance(answers[-1], MlflowException) and "(2, 63)" in str(answers[-1])
    for x, answer in zip(good, answers):
        assert isinstance(answer, np.ndarray) and answer.shape == (x.shape[0], 10)


def test_requests_with_equal_shapes_but_different_values_queue_and_merge():
    """Regression: requests were compared by value when taken from the queue (numpy arrays of
    different batch sizes cannot be compared), which killed the worker and left every caller
    waiting."""
    batcher = DynamicBatcher(lambda inputs: [inputs["x"] + 1], BatchingConfig(max_batch_size=16, max_delay_ms=50))
    xs = [np.full((1 + i % 3, 4), float(i)) for i in range(12)]
    start, answers = threading.Barrier(len(xs)), {}

    def call(i):
        start.wait()
        answers[i] = batcher.submit({"x": xs[i]})[0]

    # Daemon threads joined with a deadline: a stranded caller fails the test, never hangs it.
    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(xs))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert len(answers) == len(xs), f"{len(xs) - len(answers)} caller(s) never answered"
        for i, x in enumerate(xs):
            np.testing.assert_array_equal(answers[i], x + 1)
        assert batcher.batches_run < len(xs)
    finally:
        batcher.close()


def test_an_error_while_running_fails_only_the_callers_of_that_batch():
    """The batcher's contract over any runner: here a function that refuses one marked input
    (no real runtime fails on demand)."""
    def run(inputs):
        x = inputs["x"]
        if (x == -1).any():
            raise RuntimeError("runtime failure")
        return [x * 2]

    batcher = DynamicBatcher(run, BatchingConfig(max_batch_size=8, max_delay_ms=0))
    try:
        with pytest.raises(RuntimeError, match="runtime failure"):
            batcher.submit({"x": np.full((1, 3), -1.0)})
        np.testing.assert_array_equal(batcher.submit({"x": np.ones((2, 3))})[0], np.full((2, 3), 2.0))
    finally:
        batcher.close()


def test_a_fault_while_forming_a_batch_fails_the_callers_it_took_instead_of_stranding_them():
    """A bug in the worker's batch forming (forced here by a subclass: no real input makes it
    fail) must answer the caller it already took off the queue, and the worker goes on."""
    class Faulty(DynamicBatcher):
        faults = 1

        def _take_matching(self, key, room):
            if self.faults:
                self.faults -= 1
                raise RuntimeError("fault while forming")
            return super()._take_matching(key, room)

    batcher = Faulty(lambda inputs: [inputs["x"] + 1], BatchingConfig(max_batch_size=8, max_delay_ms=0))
    try:
        outcome = Future()

        def call():
            try:
                outcome.set_result(batcher.submit({"x": np.zeros((1, 2))}))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome.set_exception(exc)

        threading.Thread(target=call, daemon=True).start()
        with pytest.raises(RuntimeError, match="fault while forming"):
            outcome.result(timeout=10)
        np.testing.assert_array_equal(batcher.submit({"x": np.ones((1, 2))})[0], np.full((1, 2), 2.0))
    finally:
        batcher.close()


@pytest.mark.parametrize("setting, message", [
    ({"max_batch_size": 0}, "must be between 1 and"),
    ({"max_batch": 8}, r"keys \['max_batch'\] are not known"),
    ("fast", "batching 'fast' is not understood"),
])
def test_bad_batching_settings_are_clear_errors(mlp_path, setting, message):
    with pytest.raises(MlflowException, match=message):
        mlflow.pyfunc.load_model(str(mlp_path), model_config={"batching": setting})


@pytest.mark.serve
@pytest.mark.slow
def test_models_serve_with_batching_answers_each_request_with_its_own_rows(mlp_path, tracking_uri):
    import json

    plain = mlflow.pyfunc.load_model(str(mlp_path))
    port = servers.free_port()
    env = servers.venv_env({"MLFLOW_TRACKING_URI": tracking_uri, "SERVING_MODEL_CONFIG": json.dumps(
        {"batching": BATCHING})})
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(mlp_path), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    inputs = _requests(16)
    bodies = [{"inputs": x.tolist()} for x in inputs] + [{"inputs": [[1.0, 2.0]]}]  # the last is malformed
    with servers.running(cmd, port, "/ping", env, "mlflow models serve", timeout=120) as server:
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(
                lambda body: requests.post(f"{server.url}/invocations", json=body, timeout=60), bodies))
        assert responses[-1].status_code == 400 and "64" in responses[-1].text, responses[-1].text
        for x, resp in zip(inputs, responses):
            assert resp.status_code == 200, resp.text
            np.testing.assert_allclose(np.asarray(resp.json()["predictions"], dtype=np.float32), plain.predict(x),
                                       atol=1e-5, rtol=1e-5)
        assert requests.post(f"{server.url}/invocations", json=bodies[0], timeout=30).status_code == 200
