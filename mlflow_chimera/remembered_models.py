"""Registered-model URIs this host has loaded, remembered so that it can load them again while
the tracking server is down.

``mlflow.pyfunc.load_model("models:/clf/3")`` and ``mlflow models serve -m models:/clf/3`` ask
the registry what ``clf/3`` is before anything else, so a host whose tracking server is down
cannot even start — although everything it serves (the small model directory, the variant it
runs, the anchor that vouches for them) was fetched and verified before. When a chimera model
loads through a ``models:/`` URI and its manifest matched the anchor just read from the
tracking store, its model directory is copied into the local cache (``models/``), keyed by
the URI and the registry it was resolved against. :mod:`mlflow_chimera.models_repository`
serves that copy when the registry cannot be reached; the loader then checks it against the
anchor remembered with it (:mod:`mlflow_chimera.tracking_reads`), exactly as a fresh download.

Only chimera models are remembered, and only after they were verified. The cache is the
loading host's own disk, as trusted as the verified payloads already in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

_MODELS = "models"
_RECORD = "remembered.json"
_COPY = "model"
REMEMBER_ENV = "CHIMERA_REMEMBER_MODELS"  # "0" turns remembering and serving copies off


def enabled() -> bool:
    return os.environ.get(REMEMBER_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _entry(uri: str, registry_uri: str) -> Path:
    from mlflow_chimera.cache import cache_root

    key = hashlib.sha256(f"{registry_uri}\n{uri}".encode()).hexdigest()
    return cache_root() / _MODELS / key


def registry_uri() -> str:
    import mlflow

    return mlflow.get_registry_uri()


def remember(uri: str, model_dir: Path) -> None:
    """Keep a copy of the verified ``model_dir`` reached through ``uri`` (best effort: a cache
    that cannot be written only means this host cannot load the model while the registry is
    down). The copy replaces an earlier one whole, so a reader never sees half of each."""
    if not uri.startswith("models:/") or not enabled():
        return
    registry = registry_uri()
    entry = _entry(uri, registry)
    if Path(model_dir).resolve() == (entry / _COPY).resolve():
        return  # loaded from this very copy
    if _same_model(entry / _COPY, Path(model_dir)):
        return  # remembered already: the MLmodel (which pins every record by digest) is the same
    meta = _registered_meta(Path(model_dir))
    record = {"uri": uri, "registry_uri": registry, "model_name": meta.get("model_name"),
              "model_version": meta.get("model_version"),
              "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
        try:
            shutil.copytree(model_dir, staging / _COPY, symlinks=False)
            (staging / _RECORD).write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
            old = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.old")
            if entry.exists():
                os.replace(entry, old)
            os.replace(staging, entry)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass


def remembered(uri: str, registry: str) -> tuple[Path, dict] | None:
    """``(model directory, record)`` remembered for ``uri`` resolved against ``registry``."""
    if not enabled():
        return None
    entry = _entry(uri, registry)
    try:
        record = json.loads((entry / _RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    copy = entry / _COPY
    if not isinstance(record, dict) or record.get("uri") != uri or not (copy / "MLmodel").is_file():
        return None
    return copy, record


def _same_model(copy: Path, model_dir: Path) -> bool:
    try:
        return (copy / "MLmodel").read_bytes() == (model_dir / "MLmodel").read_bytes()
    except OSError:
        return False


def _registered_meta(model_dir: Path) -> dict:
    """The name and version MLflow wrote beside a registered model it downloaded."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "registered_model_meta").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return meta if isinstance(meta, dict) else {}
