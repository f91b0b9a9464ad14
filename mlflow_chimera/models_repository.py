"""MLflow's ``models:/`` artifact repository, able to serve a remembered copy while the
registry is down (registered for the ``models`` scheme through the
``mlflow.artifact_repository`` entry point).

It behaves exactly as MLflow's own ``ModelsArtifactRepository`` unless this host remembers a
copy of the URI (see :mod:`mlflow_chimera.remembered_models`, which remembers only chimera
models it verified). Then the registry is asked within ``CHIMERA_TRACKING_TIMEOUT`` (no
question at all under ``CHIMERA_OFFLINE=1``); when it cannot be reached, the copy is served
from the local cache, with a warning saying when it was fetched. A registry that answers —
even with an error such as "no such version" — is always believed.
"""

from __future__ import annotations

import logging

from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository as _MLflowModelsRepository

from mlflow_chimera import remembered_models, tracking_reads

_logger = logging.getLogger("mlflow.chimera")


class ModelsArtifactRepository(_MLflowModelsRepository):
    """``models:/`` URIs, falling back to a remembered copy when the registry is unreachable."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
        registry = registry_uri or remembered_models.registry_uri()
        copy = remembered_models.remembered(artifact_uri, registry)
        if copy is None:
            super().__init__(artifact_uri, tracking_uri, registry_uri)
            return
        try:
            resolved = tracking_reads.bounded(
                lambda: _MLflowModelsRepository(artifact_uri, tracking_uri, registry_uri),
                f"what {artifact_uri} names", store_uri=registry)
        except tracking_reads.TrackingUnavailable as exc:
            self._serve_copy(artifact_uri, tracking_uri, registry_uri, copy, exc)
            return
        self.__dict__.update(resolved.__dict__)

    def _serve_copy(self, artifact_uri, tracking_uri, registry_uri, copy, why) -> None:
        directory, record = copy
        ArtifactRepository.__init__(self, artifact_uri, tracking_uri, registry_uri)
        self.is_logged_model_uri = self._is_logged_model_uri(artifact_uri)
        self.model_name = record.get("model_name")
        self.model_version = record.get("model_version")
        self.repo = LocalArtifactRepository(str(directory))
        _logger.warning("chimera: %s; serving the copy of %s this host fetched and verified at %s (%s)",
                        why, artifact_uri, record.get("fetched_at"), directory)
