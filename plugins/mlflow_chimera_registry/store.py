"""The registry store: MLflow's SQLAlchemy registry store, plus ``chimera.*`` tags on new
versions of chimera models.

Every way of creating a model version ends in the registry store's ``create_model_version``:
the Python client (``MlflowClient.create_model_version``, ``mlflow.register_model``,
``log_model(registered_model_name=…)``), the REST API and the UI's *Register model* button
(``POST /ajax-api/2.0/mlflow/model-versions/create`` with ``source=models:/<model_id>`` and
``model_id``). So the tagging lives here, on the server, and needs nothing of the client.

Which facts, in order:

1. The LoggedModel named by ``model_id`` (or by a ``models:/<model_id>`` source), read from the
   tracking store (inside the server: the server's own store, the one its handlers use) — or,
   for a version made from another (``source=models:/<name>/<version>``, which reaches the store
   without a model_id: the SQL registry keeps none on a version), that version. If it carries
   chimera facts — ``chimera.reference_sha256`` or ``chimera.variants``, both written by
   ``mlflow.chimera.log_model`` — its ``chimera.*`` tags are copied, except
   ``chimera.host_class``: mlflow-chimera's run context provider puts that one on *every* run and
   LoggedModel created where the library is installed, chimera model or not, so it neither makes
   a model a chimera model nor describes the version. A description the library wrote there
   (starting with ``**mlflow-chimera**``) becomes the version's when the request has none.
2. Otherwise the model's ``MLmodel``: when it has a ``chimera`` flavor (e.g. the version that
   ``log_model(registered_model_name=…)`` registers before the library has written its tags),
   the facts the flavor states: ``chimera.reference_sha256``, ``chimera.variants``,
   ``chimera.build_host_class``, ``chimera.version``. Inside the server, ``mlflow-artifacts:/``
   locations are read from the server's artifact destination (a client call to the server from
   within itself would not resolve them).

Tags in the request win over copied ones; values are clipped to 5000 characters and every tag
is checked with MLflow's own validator before it is added. Nothing here fails a registration:
any error is logged as a warning and the version is created exactly as requested.

The tag names, the description mark and the status words mirror ``mlflow_chimera.tracking``
and ``mlflow_chimera.report``; they are repeated here because this package must not import the
library (which is not installed on a tracking server).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import urllib.parse

from mlflow.entities.model_registry import ModelVersionTag
from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from mlflow_chimera_registry import SCHEME_PREFIX

_logger = logging.getLogger("mlflow_chimera_registry")

TAG_PREFIX = "chimera."
# Tags whose presence on a LoggedModel means "this is a chimera model" (written by log_model).
IDENTITY_TAGS = (f"{TAG_PREFIX}reference_sha256", f"{TAG_PREFIX}variants")
# Put on every run / LoggedModel by mlflow-chimera's run context provider; not a model fact.
CONTEXT_TAGS = frozenset({f"{TAG_PREFIX}host_class"})
MAX_TAG_VALUE = 5000
DESCRIPTION_TAG = "mlflow.note.content"
DESCRIPTION_MARK = "**mlflow-chimera**"
MAX_DESCRIPTION = 5000  # the model_versions.description column
FLAVOR = "chimera"
STATUS_WORDS = {"ready": "passed", "failed_parity": "failed parity", "build_failed": "build failed"}
_PROMPT_TAG = "mlflow.prompt.is_prompt"

# Set by `mlflow server` in the server processes (mlflow.server.constants).
_SERVER_BACKEND_ENV = "_MLFLOW_SERVER_FILE_STORE"
_SERVER_READ_REPLICA_ENV = "_MLFLOW_SERVER_READ_REPLICA_BACKEND_STORE"


def database_uri(store_uri: str) -> str:
    """``chimera+sqlite:///x.db`` -> ``sqlite:///x.db``."""
    if not store_uri.startswith(SCHEME_PREFIX):
        raise ValueError(f"not a chimera registry URI (expected {SCHEME_PREFIX}<database>://…): "
                         f"{store_uri!r}")
    return store_uri[len(SCHEME_PREFIX):]


class ChimeraTagging:
    """Mixin for a SQLAlchemy registry store: chimera tags on new model versions."""

    _chimera_tracking_uri: str | None = None

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None,
                             description=None, local_model_path=None, model_id=None):
        try:
            extra_tags, extra_description = self._chimera_additions(name, source, tags, model_id)
        except Exception as exc:  # noqa: BLE001 - tagging must never fail a registration
            _logger.warning("chimera registry: could not read chimera facts for a new version of "
                            "%r (source %s, model_id %s); registering it without them: %s",
                            name, source, model_id, exc)
            extra_tags, extra_description = {}, None
        if extra_tags:
            tags = list(tags or []) + [ModelVersionTag(k, v) for k, v in extra_tags.items()]
        if extra_description and not description:
            description = extra_description
        return super().create_model_version(
            name, source, run_id=run_id, tags=tags, run_link=run_link, description=description,
            local_model_path=local_model_path, model_id=model_id,
        )

    # -- what to add -----------------------------------------------------------------------------

    def _chimera_additions(self, name, source, tags, model_id) -> tuple[dict, str | None]:
        requested = {t.key: t.value for t in tags or []}
        if _PROMPT_TAG in requested:
            return {}, None
        model_id = model_id or _model_id_from_source(source)
        logged = self._chimera_logged_model(model_id) if model_id else None
        found, description = {}, None
        if logged is not None:
            facts_tags, note = dict(logged.tags or {}), (logged.tags or {}).get(DESCRIPTION_TAG)
        else:  # a version made from another version (source models:/<name>/<version>)
            facts_tags, note = self._chimera_source_version(source)
        if any(facts_tags.get(k) for k in IDENTITY_TAGS):
            found = {k: v for k, v in facts_tags.items()
                     if k.startswith(TAG_PREFIX) and k not in CONTEXT_TAGS}
            if note and note.startswith(DESCRIPTION_MARK) and len(note) <= MAX_DESCRIPTION:
                description = note
        else:
            location = logged.artifact_location if logged is not None else self._source_location(source)
            flavor = _read_flavor(location) if location else None
            if flavor is not None:
                found = tags_from_flavor(flavor)
        return _valid_tags(found, skip=requested), description

    def _chimera_logged_model(self, model_id: str):
        if _in_server():
            # The server's own tracking store: what its handlers read and write.
            from mlflow.server.handlers import _get_tracking_store

            return _get_tracking_store().get_logged_model(model_id)
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self._chimera_tracking_uri).get_logged_model(model_id)

    def _chimera_source_version(self, source: str) -> tuple[dict, str | None]:
        """Tags and description of the version ``models:/<name>/<version>`` names (the SQL
        registry keeps no model_id on a version, so a version made from another one reaches the
        store without one)."""
        if not source or urllib.parse.urlparse(source).scheme != "models":
            return {}, None
        from mlflow.store.artifact.utils.models import _parse_model_uri

        parsed = _parse_model_uri(source)
        if parsed.model_id is not None or not (parsed.name and parsed.version):
            return {}, None
        mv = self.get_model_version(parsed.name, parsed.version)
        return dict(mv.tags or {}), mv.description

    def _source_location(self, source: str) -> str | None:
        """Where the model's files are, for a source that names no LoggedModel."""
        if urllib.parse.urlparse(source).scheme == "models":
            from mlflow.store.artifact.utils.models import _parse_model_uri

            parsed = _parse_model_uri(source)
            if parsed.name and parsed.version:
                return self.get_model_version_download_uri(parsed.name, parsed.version)
            return None
        return source


# -- helpers -------------------------------------------------------------------------------------


def _in_server() -> bool:
    return bool(os.environ.get(_SERVER_BACKEND_ENV)) and "mlflow.server.handlers" in sys.modules


def _model_id_from_source(source: str | None) -> str | None:
    if not source or urllib.parse.urlparse(source).scheme != "models":
        return None
    from mlflow.store.artifact.utils.models import _parse_model_uri

    return _parse_model_uri(source).model_id


def _read_flavor(location: str) -> dict | None:
    """The ``chimera`` flavor of ``<location>/MLmodel``, or None when there is none."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="chimera-registry-") as tmp:
        local = _download_mlmodel(location, tmp)
        with open(local, encoding="utf-8") as f:
            mlmodel = yaml.safe_load(f) or {}
    flavor = (mlmodel.get("flavors") or {}).get(FLAVOR)
    return flavor if isinstance(flavor, dict) else None


def _download_mlmodel(location: str, dst: str) -> str:
    if _in_server():
        from mlflow.server import handlers

        if handlers._is_servable_proxied_run_artifact_root(location):
            # mlflow-artifacts:/… is this server's own artifact destination.
            repo = handlers._get_artifact_repo_mlflow_artifacts()
            path = handlers._get_proxied_run_artifact_destination_path(location, "MLmodel")
            path = handlers._get_workspace_scoped_repo_path_if_enabled(path)
            return repo.download_artifacts(path, dst_path=dst)
        repo = handlers._get_artifact_repository_for_uri(location)
        return repo.download_artifacts("MLmodel", dst_path=dst)
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=location.rstrip("/") + "/MLmodel", dst_path=dst)


def tags_from_flavor(flavor: dict) -> dict:
    """The facts a ``chimera`` flavor states, as tags (same names and formats as the library's)."""
    tags = {}
    variants = flavor.get("variants") or {}
    if isinstance(variants, dict) and variants:
        groups = {}
        for vid, entry in variants.items():
            status = str((entry or {}).get("status", "unknown"))
            groups.setdefault(STATUS_WORDS.get(status, status), []).append(str(vid))
        n = len(variants)
        tags[f"{TAG_PREFIX}variants"] = " · ".join(
            [f"{n} variant" if n == 1 else f"{n} variants"]
            + [f"{word}: {', '.join(ids)}" for word, ids in groups.items()])
    reference = flavor.get("reference") or {}
    if isinstance(reference, dict) and reference.get("sha256"):
        tags[f"{TAG_PREFIX}reference_sha256"] = str(reference["sha256"])
    if flavor.get("build_host_class"):
        tags[f"{TAG_PREFIX}build_host_class"] = str(flavor["build_host_class"])
    if flavor.get("chimera_version"):
        tags[f"{TAG_PREFIX}version"] = str(flavor["chimera_version"])
    return tags


def _clip(value: str, limit: int = MAX_TAG_VALUE) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _valid_tags(tags: dict, skip=()) -> dict:
    """``tags`` clipped and checked with MLflow's validator; the invalid ones are dropped (with a
    warning), as are keys in ``skip`` (given in the request)."""
    from mlflow.utils.validation import _validate_model_version_tag

    out = {}
    for key, value in tags.items():
        if key in skip or value is None:
            continue
        value = _clip(str(value))
        try:
            _validate_model_version_tag(key, value)
        except Exception as exc:  # noqa: BLE001
            _logger.warning("chimera registry: not copying tag %r: %s", key, exc)
            continue
        out[key] = value
    return out


# -- the stores ----------------------------------------------------------------------------------


class ChimeraSqlAlchemyStore(ChimeraTagging, SqlAlchemyStore):
    """MLflow's SQLAlchemy registry store with chimera tags on new versions."""


@functools.lru_cache(maxsize=None)
def _workspace_store_class():
    from mlflow.store.model_registry.sqlalchemy_workspace_store import (
        WorkspaceAwareSqlAlchemyStore,
    )

    class ChimeraWorkspaceAwareSqlAlchemyStore(ChimeraTagging, WorkspaceAwareSqlAlchemyStore):
        """MLflow's workspace-aware SQLAlchemy registry store with chimera tags on new versions."""

    return ChimeraWorkspaceAwareSqlAlchemyStore


def build_store(store_uri: str, tracking_uri: str | None = None):
    """The store for ``chimera+<database URI>``: what MLflow would build for the database URI
    (workspace-aware when workspaces are on, the server's read replica when it has one)."""
    read_db_uri = os.environ.get(_SERVER_READ_REPLICA_ENV) or None
    if read_db_uri and read_db_uri.startswith(SCHEME_PREFIX):
        read_db_uri = database_uri(read_db_uri)
    cls = _workspace_store_class() if MLFLOW_ENABLE_WORKSPACES.get() else ChimeraSqlAlchemyStore
    store = cls(database_uri(store_uri), read_db_uri=read_db_uri)
    store._chimera_tracking_uri = tracking_uri
    return store
