"""A local content-addressed cache for variant files and reference programs fetched from
artifact storage.

A chimera model logged to a tracking store keeps its payloads (each variant's files, the
reference program) outside the model directory, so loading the model downloads only the small
model directory, and the loader fetches just the variant it runs. Entries are keyed by sha256
(of the file, or of the ``variant.json`` that pins every file's digest), verified when they
enter the cache and again before use; a second load on the same host re-uses them.

Location: ``$CHIMERA_CACHE_DIR``, else ``~/.cache/mlflow-chimera``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mlflow_chimera.manifest import (
    IntegrityError,
    check_relative_path,
    check_sha256,
    sha256_file,
    verify_digests,
)


def cache_root() -> Path:
    root = os.environ.get("CHIMERA_CACHE_DIR") or os.path.join(Path.home(), ".cache", "mlflow-chimera")
    return Path(root)


def _download(artifact_uri: str, dst: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))


def fetch_dir(artifact_uri: str, key: str, files: dict, kind: str = "variants") -> Path:
    """A verified local copy of ``files`` ({relative path: sha256}) from the directory at
    ``artifact_uri``, cached under ``key``. Only the listed files are fetched, one by one."""
    target = cache_root() / kind / check_sha256(key, "cache key")
    if target.is_dir():
        try:
            verify_digests(target, files)
            return target
        except IntegrityError:
            shutil.rmtree(target, ignore_errors=True)  # a damaged entry is fetched again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        fetched = Path(tmp, "files")
        fetched.mkdir()
        for rel in files:
            folder = Path(fetched, check_relative_path(rel)).parent
            folder.mkdir(parents=True, exist_ok=True)
            _download(f"{artifact_uri.rstrip('/')}/{rel}", str(folder))
        verify_digests(fetched, files)
        try:
            os.rename(fetched, target)  # atomic: a concurrent loader sees all or nothing
        except OSError:
            if not target.is_dir():
                raise
    return target


def fetch_file(artifact_uri: str, sha256: str, name: str, kind: str = "reference") -> Path:
    """A verified local copy of the single file at ``artifact_uri``, cached by its sha256."""
    target = cache_root() / kind / check_sha256(sha256) / check_relative_path(name)
    if target.is_file() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".fetch-") as tmp:
        fetched = _download(artifact_uri, tmp)
        actual = sha256_file(fetched)
        if actual != sha256:
            raise IntegrityError(f"{artifact_uri} has sha256 {actual[:12]}…, expected {sha256[:12]}…")
        os.replace(fetched, target)
    return target
