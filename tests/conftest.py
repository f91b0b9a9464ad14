"""Shared fixtures: a real sqlite tracking store per test session, and models logged once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Keep log-time benchmarks short in tests; timings are not asserted on.
os.environ.setdefault("CHIMERA_BENCH_MAX_SECONDS", "0.15")


def _session_keys() -> Path:
    """An EC key pair for the session: what tests log and publish is signed with it and
    trusted, as on an operator's fleet. Tests about unsigned variants unset these."""
    import tempfile

    from mlflow_chimera.signing import generate_key_pair

    folder = Path(tempfile.mkdtemp(prefix="chimera-test-keys-"))
    generate_key_pair(folder / "signing.pem", folder / "trusted.pub")
    return folder


_KEYS = _session_keys()
os.environ.setdefault("CHIMERA_SIGNING_KEY", str(_KEYS / "signing.pem"))
os.environ.setdefault("CHIMERA_TRUSTED_KEYS", str(_KEYS / "trusted.pub"))


@pytest.fixture(scope="session")
def session_keys() -> Path:
    """The session's key folder: ``signing.pem`` (private) and ``trusted.pub``."""
    return _KEYS


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """A real MLflow tracking store (sqlite) with local artifacts, shared by the session."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    # Artifacts under the same temporary folder, never an mlruns/ in the working directory.
    mlflow.create_experiment("chimera-tests", artifact_location=(root / "artifacts").as_uri())
    experiment = mlflow.set_experiment("chimera-tests")
    assert experiment.artifact_location
    yield uri


class LoggedModels:
    """Logs each test model at most once per session (logging builds and times every variant)."""

    def __init__(self):
        self._infos = {}

    def get(self, kind: str, **options):
        import mlflow
        import mlflow.chimera  # noqa: F401  (the alias under test)

        import models

        # ONNX Runtime and eager unless a test asks otherwise (backends=None: every backend);
        # AOTInductor and torch.compile builds take tens of seconds each on two cores.
        options.setdefault("backends", ["onnxruntime", "eager"])
        key = (kind, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._infos:
            model = models.BUILDERS[kind]()
            example = models.examples()[kind]
            name = f"{kind}-{len(self._infos)}"
            info = mlflow.chimera.log_model(
                model, name=name, input_example=example, registered_model_name=name, **options
            )
            self._infos[key] = (info, model, example, name)
        return self._infos[key]


@pytest.fixture(scope="session")
def logged(tracking_uri):
    return LoggedModels()
