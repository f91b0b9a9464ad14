"""A loader whose tracking store is down: bounded in time, and serving what it verified before.

The outage is real: the tracking URI points at a closed port on 127.0.0.1, so MLflow's HTTP
client meets a refused connection and retries it, as it would with a server that is down.
"""

from __future__ import annotations

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
