"""A local content-addressed cache for variant files and reference programs fetched from
artifact storage.

A chimera model logged to a tracking store keeps its payloads (each variant's files, the
reference program) outside the model directory, so loading the model downloads only the small
model directory, and the loader fetches just the variant it runs. Entries are keyed by sha256
(of the file, or of the ``variant.json`` that pins every file's digest), verified when they
enter the cache and again before use; a second load on the same host re-uses them.

Location: ``$CHIMERA_CACHE_DIR``, else ``~/.cache/mlflow-chimera``.

Locked-down hosts. A cache directory that cannot be written (a read-only root file system) is
still read: entries already there (``chimera prefetch`` at image build) are verified and used
without writing. What is missing is fetched into a private temporary directory made once per
process (:func:`writable_root`), with one warning. A fetch that does not fit on the disk raises
:class:`CacheSpaceError` (an ``OSError``) naming the directory, the bytes needed and the bytes
free, and leaves nothing behind; the loader then tries its next variant.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from mlflow_chimera.manifest import (
    IntegrityError,
    check_relative_path,
    check_sha256,
    sha256_file,
    verify_digests,
)

CACHE_ENV = "CHIMERA_CACHE_DIR"
_logger = logging.getLogger("mlflow.chimera")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_lock = threading.Lock()
_scratch: Path | None = None  # this process's private fallback, made on first need
_warned: set = set()  # cache roots already reported as not writable
_recorders: list = []  # lists collecting the entries used, see recorded()


class CacheError(OSError):
    """The cache cannot take a fetch; ``directory`` is where it tried to write."""

    def __init__(self, code: int, message: str, directory: Path):
        super().__init__(code, message)
        self.directory = Path(directory)

    def __str__(self) -> str:
        return self.strerror


class CacheSpaceError(CacheError):
    """Not enough free space in the cache directory for a fetch."""

    def __init__(self, directory: Path, what: str, needed: int | None, free: int):
        need = "ran out while fetching it" if needed is None else f"needs {needed} bytes ({_human(needed)})"
        super().__init__(errno.ENOSPC, f"not enough space in {directory} for {what}: {need}, "
                         f"{free} bytes ({_human(free)}) free", directory)
        self.needed = needed
        self.free = free


class CacheUnwritableError(CacheError):
    """Neither the cache directory nor a temporary directory can be written."""


def cache_root() -> Path:
    """The configured cache directory: ``$CHIMERA_CACHE_DIR``, else ``~/.cache/mlflow-chimera``.
    It may be read-only; writers use :func:`writable_root`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "mlflow-chimera")
    return Path(root)


def unwritable_reason(folder: Path) -> str | None:
    """Why ``folder`` (created if missing) cannot be written, or None if it can. A full disk
    counts as writable: the fetch then reports the space it lacks."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            return None
        return exc.strerror or str(exc)
    return None


def writable_root() -> Path:
    """Where to write cache entries and runtime caches: :func:`cache_root` when it can be
    written, else a private temporary directory made once per process (under ``TMPDIR``),
    saying so once. Raises :class:`CacheUnwritableError` when neither can be written."""
    root = cache_root()
    why = unwritable_reason(root)
    if why is None:
        return root
    scratch = _scratch_dir(root, why)
    with _lock:
        first = str(root) not in _warned
        _warned.add(str(root))
    if first:
        _logger.warning("chimera: the cache directory %s cannot be written (%s); this process fetches into %s "
                        "instead, again after each restart. Set %s to a writable directory (e.g. an emptyDir "
                        "volume), or fill this one when building the image with `chimera prefetch`.",
                        root, why, scratch, CACHE_ENV)
    return scratch


def _scratch_dir(root: Path, why: str) -> Path:
    global _scratch
    with _lock:
        if _scratch is None or not _scratch.is_dir():
            try:
                _scratch = Path(tempfile.mkdtemp(prefix="chimera-cache-"))
            except OSError as exc:  # includes tempfile's "No usable temporary directory found"
                tried = tempfile.tempdir or os.environ.get("TMPDIR") or "the temporary directory"
                raise CacheUnwritableError(
                    exc.errno or errno.EROFS,
                    f"no writable cache directory: {root} ({why}) and {tried} ({exc.strerror or exc}) "
                    f"cannot be written; set {CACHE_ENV} to a writable directory", root) from exc
            atexit.register(_remove_scratch, _scratch, os.getpid())
        return _scratch


def _remove_scratch(folder: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child must not remove its parent's copies
        shutil.rmtree(folder, ignore_errors=True)


def _read_roots() -> list:
    """Where entries may already be: the cache directory, then this process's fallback."""
    return [cache_root()] + ([_scratch] if _scratch is not None else [])


@contextlib.contextmanager
def recorded():
    """Collect ``(kind, path, fetched)`` for every entry fetched (``fetched=True``) or found in
    the cache during the block: what ``chimera prefetch`` reports."""
    seen = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def _used(kind: str, path: Path, fetched: bool = False) -> Path:
    for seen in _recorders:
        if not any(entry[1] == path for entry in seen):
            seen.append((kind, path, fetched))
    return path


# -- fetching ---------------------------------------------------------------------------------


def _download(artifact_uri: str, dst: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))


def fetch_dir(artifact_uri: str, key: str, files: dict, kind: str = "variants", size: int | None = None) -> Path:
    """A verified local copy of ``files`` ({relative path: sha256}) from the directory at
    ``artifact_uri``, cached under ``key``. Only the listed files are fetched, one by one.
    ``size`` (total bytes, when known) is checked against the free space first."""
    relative = Path(kind, check_sha256(key, "cache key"))
    for root in _read_roots():
        found = root / relative
        if found.is_dir():
            try:
                verify_digests(found, files)
                return _used(kind, found)
            except IntegrityError:
                shutil.rmtree(found, ignore_errors=True)  # a damaged entry is fetched again
    root = writable_root()
    target = root / relative
    what = artifact_uri.rstrip("/").rsplit("/", 1)[-1]
    with _space_checked(root, what, size, lambda: _listed_size(artifact_uri, files)):
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
    return _used(kind, target, fetched=True)


def fetch_file(artifact_uri: str, sha256: str, name: str, kind: str = "reference", size: int | None = None) -> Path:
    """A verified local copy of the single file at ``artifact_uri``, cached by its sha256.
    ``size`` (bytes, when known) is checked against the free space first."""
    relative = Path(kind, check_sha256(sha256), check_relative_path(name))
    for root in _read_roots():
        found = root / relative
        if found.is_file() and sha256_file(found) == sha256:
            return _used(kind, found)
    root = writable_root()
    target = root / relative
    parent_uri, _, base = artifact_uri.rstrip("/").rpartition("/")
    with _space_checked(root, name, size, lambda: _listed_size(parent_uri, {base: None})):
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".fetch-") as tmp:
            fetched = _download(artifact_uri, tmp)
            actual = sha256_file(fetched)
            if actual != sha256:
                raise IntegrityError(f"{artifact_uri} has sha256 {actual[:12]}…, expected {sha256[:12]}…")
            target.parent.mkdir(exist_ok=True)
            os.replace(fetched, target)
    return _used(kind, target, fetched=True)


# -- free space -------------------------------------------------------------------------------


def free_bytes(folder: Path) -> int:
    """Bytes free to this process on the file system holding ``folder`` (or its nearest
    existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def _space_checked(root: Path, what: str, size, listed_size):
    """Refuse a fetch of ``size`` bytes that cannot fit in ``root``; turn a fetch that failed
    for lack of space into :class:`CacheSpaceError`. MLflow wraps a full disk in a download
    error about the path, so a failed download counts as one when the file system has less
    free space than the payload needs (``listed_size()`` asks the store when ``size`` is not
    known). The block's temporary directory is gone before the free space is measured."""
    needed = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    free = free_bytes(root) if needed is not None else None
    if free is not None and free < needed:
        raise CacheSpaceError(root, what, needed, free)
    try:
        yield
    except (OSError, _mlflow_exception()) as exc:
        if isinstance(exc, CacheError):
            raise
        full = isinstance(exc, OSError) and exc.errno in _NO_SPACE
        if needed is None and not full:
            needed = listed_size()
        free = free_bytes(root)
        if full or (needed is not None and free < needed):
            raise CacheSpaceError(root, what, needed, free) from exc
        raise


def _mlflow_exception():
    from mlflow.exceptions import MlflowException

    return MlflowException


def _listed_size(artifact_uri: str, files: dict) -> int | None:
    """Total bytes of ``files`` in the artifact directory ``artifact_uri``, from a listing (only
    top-level names; None when the store does not say)."""
    import mlflow

    try:
        listed = {i.path.rstrip("/").rsplit("/", 1)[-1]: i.file_size
                  for i in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri)}
        sizes = [listed[rel] for rel in files]
    except Exception:  # noqa: BLE001 - only used to word an error; the original is raised otherwise
        return None
    return sum(sizes) if all(isinstance(s, int) for s in sizes) else None


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
