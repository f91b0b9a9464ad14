"""What a loader reads from the tracking store, bounded in time, and what it remembers of it.

A loader reads the tracking store for two things: the anchor of a model reached through
``models:/`` or ``runs:/`` (a must, see :mod:`mlflow_chimera.trust`), and the variants target
hosts published for it (an addition). MLflow's HTTP client retries a server that does not
answer for minutes; a serving host must not stall that long. So every read here runs with a
deadline (``CHIMERA_TRACKING_TIMEOUT`` seconds, default 5) and ``CHIMERA_OFFLINE=1`` forbids
them altogether.

An anchor that was verified once is remembered in the local cache (``anchors/``), keyed by the
URI it was reached through. When the tracking store cannot be reached, a model whose manifest
still matches the remembered anchor loads as anchored, and ``explain()`` says when the anchor
was read. The cache is the loading host's own disk, as trusted as the verified payloads in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from datetime import datetime, timezone

from mlflow_chimera.errors import ChimeraError

TIMEOUT_ENV = "CHIMERA_TRACKING_TIMEOUT"
OFFLINE_ENV = "CHIMERA_OFFLINE"
DEFAULT_TIMEOUT_S = 5.0
DOWN_FOR_S = 30.0  # after a missed deadline, how long a store counts as down without asking again
_down_until: dict = {}  # store URI -> time.monotonic() until which it counts as down
_down_lock = threading.Lock()
_ANCHORS = "anchors"


class TrackingUnavailable(ChimeraError):
    """The tracking store did not answer in time, or this host is set offline."""


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def timeout_s() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def bounded(fn, what: str, store_uri: str | None = None):
    """``fn()`` — a call to the tracking store — with a deadline. Raises
    :class:`TrackingUnavailable` when offline or when the deadline passes (the call is left to
    finish on a daemon thread, which never holds up the process's exit); ``fn``'s own errors
    are raised as they are.

    A store that missed a deadline is taken as down for :data:`DOWN_FOR_S` seconds: reads of
    it in that window fail at once, so one load pays one deadline, not one per read.
    ``store_uri`` names the store (default: the current tracking URI)."""
    if offline():
        raise TrackingUnavailable(f"{OFFLINE_ENV}=1: {what} is not read from the tracking store")
    store = store_uri or _tracking_uri()
    with _down_lock:
        down = _down_until.get(store, 0.0) > time.monotonic()
    if down:
        raise TrackingUnavailable(f"the tracking store {_redacted(store)} did not answer a read moments ago; "
                                  f"{what} is not read from it")
    outcome = {}

    def call():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="chimera-tracking-read", daemon=True)
    worker.start()
    worker.join(timeout_s())
    if worker.is_alive():
        with _down_lock:
            _down_until[store] = time.monotonic() + DOWN_FOR_S
        raise TrackingUnavailable(f"the tracking store did not answer within {timeout_s():g} s while reading "
                                  f"{what} ({TIMEOUT_ENV} sets the limit)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _redacted(uri: str) -> str:
    """``uri`` without credentials (``https://user:secret@host`` → ``https://host``)."""
    return re.sub(r"//[^/@]*@", "//", uri)


# -- remembered anchors ---------------------------------------------------------------------------


def _anchor_path(uri: str):
    from mlflow_chimera.cache import cache_root

    return cache_root() / _ANCHORS / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"


def remember_anchor(uri: str, model_id: str, tags: dict) -> None:
    """Keep what the tracking store said about the model at ``uri`` (best effort: a read-only
    cache only means the host cannot serve this model offline)."""
    path = _anchor_path(uri)
    record = {"uri": uri, "model_id": model_id, "tags": tags,
              "read_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def remembered_anchor(uri: str) -> dict | None:
    """``{"uri", "model_id", "tags", "read_at"}`` remembered for ``uri``, or ``None``."""
    try:
        record = json.loads(_anchor_path(uri).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("uri") != uri or not isinstance(record.get("tags"), dict):
        return None
    return record
