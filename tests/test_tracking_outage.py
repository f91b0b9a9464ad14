"""A loader whose tracking store is down: bounded in time, and serving what it verified before.

The outage is real: the tracking URI points at a closed port on 127.0.0.1, so MLflow's HTTP
client meets a refused connection and retries it, as it would with a server that is down.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

import models
from mlflow_chimera.trust import TrustError
from servers import free_port


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CHIMERA_TRACKING_TIMEOUT", "2")
    return tmp_path / "cache"


@pytest.fixture
def tracking_down(monkeypatch, tracking_uri):
    """Point the tracking store at a closed port for the test; restore it afterwards."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    mlflow.set_tracking_uri(dead)
    yield dead
    mlflow.set_tracking_uri(tracking_uri)


def _verified_copy(logged, tmp_path) -> tuple[str, Path, np.ndarray, np.ndarray]:
    """Load the registered MLP once through models:/ (which verifies and remembers its anchor)
    and keep a local copy of the model directory, as a serving host's disk would."""
    _, model, example, name = logged.get("mlp")
    uri = f"models:/{name}/1"
    first = mlflow.pyfunc.load_model(uri)
    expected = models.eager_outputs(model, example)[0]
    np.testing.assert_allclose(first.predict(example), expected, atol=1e-4)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "copy")))
    return uri, local, example, expected


def test_a_tracking_store_that_does_not_answer_costs_a_loader_a_few_seconds(logged, own_cache, tmp_path,
                                                                            monkeypatch, tracking_uri):
    _, _, _, name = logged.get("mlp")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "copy")))
    monkeypatch.setenv("CHIMERA_MODEL_URI", f"models:/{name}/1")
    dead = f"http://127.0.0.1:{free_port()}"
    mlflow.set_tracking_uri(dead)
    try:
        started = time.monotonic()
        with pytest.raises(TrustError, match="did not answer within 2 s") as failure:
            mlflow.chimera.load_model(str(local))
        elapsed = time.monotonic() - started
    finally:
        mlflow.set_tracking_uri(tracking_uri)
    # MLflow's own retries would take minutes; the deadline (2 s here) bounds the whole load.
    assert elapsed < 15, elapsed
    assert "has not verified this model before" in str(failure.value)
    assert "chimera prefetch" in str(failure.value)


@pytest.fixture
def verified(logged, own_cache, tmp_path, tracking_uri):
    return _verified_copy(logged, tmp_path)


def test_the_remembered_anchor_serves_a_verified_copy_when_the_store_is_down(verified, monkeypatch, tracking_down):
    uri, local, example, expected = verified
    monkeypatch.setenv("CHIMERA_MODEL_URI", uri)
    loaded = mlflow.chimera.load_model(str(local))
    np.testing.assert_allclose(loaded.predict(example), expected, atol=1e-4)
    assert "tracking store unreachable now" in loaded.explain()
    assert "anchored: manifest matches" in loaded.explain()


def test_offline_setting_reads_nothing_from_the_tracking_store(verified, monkeypatch, tracking_uri):
    uri, local, example, expected = verified
    monkeypatch.setenv("CHIMERA_MODEL_URI", uri)
    monkeypatch.setenv("CHIMERA_OFFLINE", "1")
    loaded = mlflow.chimera.load_model(str(local))
    np.testing.assert_allclose(loaded.predict(example), expected, atol=1e-4)
    assert "CHIMERA_OFFLINE=1" not in loaded.explain()  # the reason is logged; explain says when it was read
    assert "tracking store unreachable now" in loaded.explain()
    # A URI this host never verified cannot be served offline.
    monkeypatch.setenv("CHIMERA_MODEL_URI", uri.replace("/1", "/99"))
    with pytest.raises(TrustError, match="CHIMERA_OFFLINE=1.*has not verified this model before"):
        mlflow.chimera.load_model(str(local))


def test_a_remembered_anchor_does_not_cover_a_changed_model(verified, monkeypatch, tracking_down, tmp_path):
    uri, local, _, _ = verified
    changed = tmp_path / "changed"
    shutil.copytree(local, changed)
    mlmodel = yaml.safe_load((changed / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"]["precision"] = "any"  # serve int8 silently
    (changed / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    monkeypatch.setenv("CHIMERA_MODEL_URI", uri)
    with pytest.raises(TrustError, match="does not match the anchor"):
        mlflow.chimera.load_model(str(changed))


@pytest.mark.serve
@pytest.mark.slow
def test_models_serve_of_a_verified_copy_with_the_tracking_store_down(verified, own_cache):
    """The README's air-gapped recipe: a downloaded copy served with CHIMERA_OFFLINE=1 and
    CHIMERA_MODEL_URI, the tracking URI pointing at nothing."""
    import sys

    import requests

    import servers

    uri, local, example, expected = verified
    env = servers.venv_env({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "CHIMERA_OFFLINE": "1",
                            "CHIMERA_MODEL_URI": uri, "CHIMERA_CACHE_DIR": str(own_cache)})
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(local), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with servers.running(cmd, port, "/ping", env, "mlflow models serve", timeout=120) as server:
        resp = requests.post(f"{server.url}/invocations", json={"inputs": example.tolist()}, timeout=30)
        assert resp.status_code == 200, server.output()
        np.testing.assert_allclose(np.asarray(resp.json()["predictions"]), expected, atol=1e-4)
        assert "tracking store unreachable now" in server.output(), server.output()[-3000:]


@pytest.fixture
def tracking_server(tmp_path, tracking_uri):
    """A real ``mlflow server`` (sqlite, artifacts proxied through it) this test can stop; the
    session's store is restored afterwards."""
    import os
    import sys

    import servers

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    env = servers.venv_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with servers.running(cmd, port, "/health", env, "mlflow server", timeout=180, cwd=root) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.url
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("outage")
        try:
            yield server
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment("chimera-tests")


@pytest.mark.serve
@pytest.mark.slow
def test_models_uri_loads_and_serves_after_the_tracking_server_stops(tracking_server, own_cache):
    """The issue's case: the host loaded ``models:/…`` once; then the tracking server (and the
    artifacts it proxies) goes away. Loading the same URI, and serving it, still give the right
    answers — from the copy and the variant this host verified — within a bounded time."""
    import sys

    import requests

    import servers

    model, example = models.mlp(), models.examples()["mlp"]
    expected = models.eager_outputs(model, example)[0]
    mlflow.chimera.log_model(model, name="outage", input_example=example, backends=["onnxruntime"],
                             precisions=["fp32"], registered_model_name="outage-mlp")
    uri = "models:/outage-mlp/1"
    np.testing.assert_allclose(mlflow.pyfunc.load_model(uri).predict(example), expected, atol=1e-4)

    servers.stop(tracking_server.proc)
    started = time.monotonic()
    again = mlflow.pyfunc.load_model(uri)
    elapsed = time.monotonic() - started
    np.testing.assert_allclose(again.predict(example), expected, atol=1e-4)
    assert "tracking store unreachable now" in again.get_raw_model().explain()
    # One deadline (CHIMERA_TRACKING_TIMEOUT=2 here), not MLflow's minutes of retries.
    assert elapsed < 20, elapsed

    port = free_port()
    env = servers.venv_env({"MLFLOW_TRACKING_URI": tracking_server.url, "CHIMERA_CACHE_DIR": str(own_cache),
                            "CHIMERA_TRACKING_TIMEOUT": "2"})
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with servers.running(cmd, port, "/ping", env, "mlflow models serve", timeout=120) as server:
        resp = requests.post(f"{server.url}/invocations", json={"inputs": example.tolist()}, timeout=30)
        assert resp.status_code == 200, server.output()[-3000:]
        np.testing.assert_allclose(np.asarray(resp.json()["predictions"]), expected, atol=1e-4)
        assert f"serving the copy of {uri}" in server.output(), server.output()[-3000:]


def test_a_registry_that_answers_is_believed_over_a_remembered_copy(logged, own_cache, tmp_path):
    """A remembered copy stands in only for a registry that cannot be reached: one that answers
    "no such version" is believed, and a reachable one is asked every time."""
    from mlflow.exceptions import MlflowException

    from mlflow_chimera import remembered_models

    _, _, example, name = logged.get("mlp")
    uri = f"models:/{name}/1"
    mlflow.pyfunc.load_model(uri)
    copy, record = remembered_models.remembered(uri, mlflow.get_registry_uri())
    assert record["model_name"] == name and str(record["model_version"]) == "1"
    # Pretend this host had remembered a version that the registry does not have.
    missing = f"models:/{name}/77"
    shutil.copytree(copy.parent, remembered_models._entry(missing, mlflow.get_registry_uri()))
    entry = remembered_models._entry(missing, mlflow.get_registry_uri())
    (entry / "remembered.json").write_text(json.dumps({**record, "uri": missing}))
    with pytest.raises(MlflowException, match="77"):
        mlflow.pyfunc.load_model(missing)


def test_a_store_that_missed_a_deadline_is_not_asked_again_for_a_while(monkeypatch):
    """One load pays one deadline: after a read timed out, the next reads of that store fail at
    once (another store is still asked)."""
    import threading

    from mlflow_chimera import tracking_reads

    monkeypatch.setenv("CHIMERA_TRACKING_TIMEOUT", "0.5")
    release, calls = threading.Event(), []

    def hang():
        calls.append(1)
        release.wait(10)

    try:
        with pytest.raises(tracking_reads.TrackingUnavailable, match="did not answer within 0.5 s"):
            tracking_reads.bounded(hang, "a tag", store_uri="http://127.0.0.1:9/a")
        started = time.monotonic()
        with pytest.raises(tracking_reads.TrackingUnavailable, match="did not answer a read moments ago"):
            tracking_reads.bounded(hang, "another tag", store_uri="http://127.0.0.1:9/a")
        assert time.monotonic() - started < 0.2 and len(calls) == 1
        assert tracking_reads.bounded(lambda: "answered", "a tag", store_uri="http://127.0.0.1:9/b") == "answered"
    finally:
        release.set()
