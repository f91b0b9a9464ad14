"""Trust: which variants a loader may open, decided before any of their files is deserialized.

Three parties can write what a loader reads (DESIGN §5): the artifact store (files), the
tracking database (tags) and the author of a model directory someone else loads. Whatever one
of them writes, the loader

* checks every file against a digest chain whose root lies *outside* the artifact store: the
  ``chimera.anchor`` tag that ``log_model`` writes on the logged model (the digest of the
  model's manifest — the chimera section of MLmodel and its pyfunc defaults, which pin the
  reference program, the check files and every ``variant.json``), or a signature made with a
  key the loading side trusts (OpenSSF model-signing, see :mod:`mlflow_chimera.signing`);
* loads native code (AOTInductor libraries, torch.compile caches, TensorRT engines) only from
  a variant whose record is anchored or signed — under ``trust="signed"``, only signed;
* counts a variant published by a target host (``chimera.variant.<id>`` tags) only when it is
  signed by a trusted key or its publisher is on the operator's allow-list; a low p50 never
  overrides trust;
* ranks by host benchmarks stored after logging only when their digest is anchored too.

Trust settings (``CHIMERA_TRUST`` or ``mlflow_chimera.load_model(..., trust=…)``; never read
from the model itself, which an attacker may have written):

``anchored`` (default)
    A model reached through ``models:/``, ``runs:/`` or a remote store must match its anchor;
    a local directory the caller names is loaded on its own digests.
``signed``
    As ``anchored``, and native-code variants load only with a trusted signature — also from a
    local directory.
``digests``
    Files are checked against the model's own digests only (the behaviour before anchors):
    for models logged before anchors existed, on request only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_chimera import tracking_reads
from mlflow_chimera.errors import ChimeraError
from mlflow_chimera.manifest import IntegrityError, check_sha256

_logger = logging.getLogger("mlflow.chimera")

TRUST_LEVELS = ("anchored", "signed", "digests")
DEFAULT_TRUST = "anchored"
TRUST_ENV = "CHIMERA_TRUST"
MODEL_URI_ENV = "CHIMERA_MODEL_URI"  # declares where a model came from, for custom servers
PUBLISHERS_ENV = "CHIMERA_TRUSTED_PUBLISHERS"
ANCHOR_TAG = "chimera.anchor"
BENCHMARK_ANCHOR_PREFIX = "chimera.benchmark_sha256."
SIGNATURE_FILE = "variant.sig"
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:")


class TrustError(ChimeraError):
    """The model (or a variant) is refused: the message says which rule it misses."""


# -- the manifest digest ------------------------------------------------------------------------


def manifest_digest(flavor_conf: dict, pyfunc_config: dict | None) -> str:
    """sha256 of the model's manifest: the chimera section of MLmodel (reference, check files
    and every ``variant.json`` digest, signature) and the pyfunc defaults (which steer
    selection). Canonical JSON, so the same manifest always gives the same digest."""
    manifest = {"chimera": flavor_conf, "pyfunc_config": pyfunc_config or {}}
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def signing_subject(variant_json_sha256: str, variant_id: str, flavor_conf: dict) -> dict:
    """What a variant's signature covers: its record (which pins every file) and the model it
    belongs to (reference program, check files, signature)."""
    return {
        "format": "mlflow-chimera/variant-subject@1",
        "variant_id": variant_id,
        "variant_json_sha256": variant_json_sha256,
        "reference_sha256": flavor_conf["reference"]["sha256"],
        "checks": flavor_conf.get("checks", {}),
        "signature": flavor_conf.get("signature", {}),
    }


def sign_variant(variant_dir: Path, variant_id: str, flavor_conf: dict, private_key: Path) -> Path:
    """Write ``variant.sig`` beside the variant's ``variant.json``."""
    from mlflow_chimera import signing
    from mlflow_chimera.manifest import VARIANT_FILE, sha256_file

    subject = signing_subject(sha256_file(Path(variant_dir, VARIANT_FILE)), variant_id, flavor_conf)
    with tempfile.TemporaryDirectory(prefix="chimera-sign-") as tmp:
        folder = _subject_dir(tmp, subject)
        signature = signing.sign_manifest(folder, Path(private_key))
        target = Path(variant_dir, SIGNATURE_FILE)
        target.write_bytes(Path(signature).read_bytes())
    return target


def _subject_dir(tmp: str, subject: dict) -> Path:
    folder = Path(tmp, "subject")
    folder.mkdir()
    Path(folder, "subject.json").write_text(json.dumps(subject, sort_keys=True, indent=1))
    return folder


def verify_variant_signature(signature_path: Path, variant_json_sha256: str, variant_id: str,
                             flavor_conf: dict, public_keys: list) -> str:
    """The id of the trusted key whose signature covers this variant; raises otherwise."""
    from mlflow_chimera import signing

    if not Path(signature_path).is_file():
        raise TrustError(f"variant {variant_id} carries no signature ({SIGNATURE_FILE})")
    subject = signing_subject(variant_json_sha256, variant_id, flavor_conf)
    with tempfile.TemporaryDirectory(prefix="chimera-verify-") as tmp:
        folder = _subject_dir(tmp, subject)
        Path(folder, signing.SIGNATURE_FILE).write_bytes(Path(signature_path).read_bytes())
        try:
            return signing.verify_manifest(folder, public_keys)
        except signing.SignatureError as exc:
            raise TrustError(f"variant {variant_id}: {exc}") from exc


# -- where the model came from --------------------------------------------------------------------


@dataclass
class Source:
    """How the caller reached the model: the URI they asked for (``None``: a local path)."""

    uri: str | None

    @property
    def tracked(self) -> bool:
        """Reached through a tracking store or a remote artifact store (needs its anchor)."""
        return bool(self.uri) and bool(_REMOTE.match(self.uri)) and not self.uri.startswith("file:")


def requested_source(explicit_uri: str | None = None) -> Source:
    """The URI the model was asked for: given explicitly, declared by ``CHIMERA_MODEL_URI``, the
    ``model_uri`` of the ``mlflow.pyfunc.load_model`` call this load runs under, the ``-m``
    of the ``mlflow models serve`` process this server runs under (which hands its workers only
    a downloaded copy), or the URI a ``mlflow.pyfunc.spark_udf`` was made for (whose executors
    load only a copy the driver downloaded)."""
    if explicit_uri:
        return Source(str(explicit_uri))
    if os.environ.get(MODEL_URI_ENV):
        return Source(os.environ[MODEL_URI_ENV])
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_model" and frame.f_globals.get("__name__") in (
                "mlflow.pyfunc", "mlflow_chimera.flavor"):
            uri = frame.f_locals.get("model_uri")
            if isinstance(uri, str):
                return Source(_served_uri(uri) or _spark_udf_uri(frame, uri) or uri)
        frame = frame.f_back
    return Source(None)


def _spark_udf_uri(load_frame, local: str) -> str | None:
    """Under ``mlflow.pyfunc.spark_udf``, the URI the UDF was made for, when this load is the
    UDF's own load of its model. spark_udf downloads ``models:/…`` on the driver and has each
    executor load that local copy (or, on a cluster, an extracted archive of it through
    ``SparkModelCache``), so without this an executor would load a model reached through the
    tracking store as a plain local directory: no anchor check and no published variants.
    The URI is read from the UDF's closure (``model_uri``) only when ``load_model`` was called
    by the UDF itself (through MLflow's tracing decorator, and ``SparkModelCache.get_or_load``
    on a cluster); a model loaded by another model's own code inside a UDF keeps its own source."""
    if _REMOTE.match(local) and not local.startswith("file:"):
        return None
    caller = load_frame.f_back
    for _ in range(4):
        if caller is None:
            return None
        module = str(caller.f_globals.get("__name__"))
        if module == "mlflow.pyfunc" and caller.f_code.co_name == "udf":
            uri = caller.f_locals.get("model_uri")
            return uri if isinstance(uri, str) and uri != local else None
        if not (module.startswith("mlflow.tracing") or module == "mlflow.pyfunc.spark_model_cache"):
            return None
        caller = caller.f_back
    return None


def _served_uri(local: str) -> str | None:
    """Under ``mlflow models serve``, the ``-m`` URI of that command (Linux: read from the
    process's ancestors' command lines), when ``local`` is the copy it downloaded."""
    if _REMOTE.match(local) and not local.startswith("file:"):
        return None
    pid = os.getpid()
    for _ in range(6):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            pid = int(re.search(r"^PPid:\s*(\d+)", status, re.M).group(1))
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, AttributeError, ValueError):
            return None
        words = [a.decode("utf-8", "replace") for a in args]
        if "models" in words and "serve" in words:
            for flag in ("-m", "--model-uri"):
                if flag in words[:-1]:
                    return words[words.index(flag) + 1]
            for word in words:
                if word.startswith("--model-uri="):
                    return word.split("=", 1)[1]
        if pid <= 1:
            return None
    return None


# -- the policy -----------------------------------------------------------------------------------


@dataclass
class Policy:
    """What this loading side trusts."""

    level: str = DEFAULT_TRUST
    public_keys: list = field(default_factory=list)  # [Path]
    publishers: tuple = ()  # run user ids whose published variants count without a signature

    @classmethod
    def from_settings(cls, trust: str | None = None, trusted_keys=None) -> "Policy":
        level = (trust or os.environ.get(TRUST_ENV) or DEFAULT_TRUST).strip().lower()
        if level not in TRUST_LEVELS:
            raise TrustError(f"trust={level!r} is not a trust setting; expected one of {', '.join(TRUST_LEVELS)}")
        from mlflow_chimera import signing

        try:
            keys = signing.trusted_public_keys(trusted_keys)
        except signing.SignatureError as exc:
            raise TrustError(str(exc)) from exc
        publishers = tuple(p.strip() for p in os.environ.get(PUBLISHERS_ENV, "").split(",") if p.strip())
        return cls(level, keys, publishers)


@dataclass
class ModelTrust:
    """The verdict on a model as a whole, and what the tracking store says about it."""

    policy: Policy
    how: str  # in words, for explain()
    anchored: bool  # the manifest matched an anchor outside the artifact store
    model_id: str | None = None
    logged_model_tags: dict = field(default_factory=dict)
    anchor_read_now: bool = False  # the anchor came from the tracking store during this load

    def benchmark_usable(self, host_class: str, sha256: str, local: bool) -> bool:
        """Whether stored host benchmarks may steer ranking."""
        if self.policy.level == "digests" or local:
            return True
        return self.logged_model_tags.get(BENCHMARK_ANCHOR_PREFIX + host_class) == sha256


def check_model(mlmodel: dict, flavor_conf: dict, source: Source, policy: Policy) -> ModelTrust:
    """Refuse a model reached through a tracking store whose manifest does not match the anchor
    recorded there; say how a local directory is trusted. The tracking store is read once,
    within a deadline; when it cannot be reached, an anchor this host verified before for the
    same URI stands in (see :mod:`mlflow_chimera.tracking_reads`)."""
    if not source.tracked:
        how = ("local directory: loaded on its own digests" +
               ("; native code only with a trusted signature" if policy.level == "signed" else ""))
        return ModelTrust(policy, how, anchored=False)
    try:
        model_id, tags = _read_anchor(source.uri, mlmodel)
        read_from, read_now = f"the {ANCHOR_TAG} tag of logged model {model_id}", True
    except tracking_reads.TrackingUnavailable as exc:
        (model_id, tags, read_from), read_now = _remembered(source.uri, mlmodel, exc), False
    if policy.level == "digests":
        return ModelTrust(policy, f"trust=digests: {source.uri} checked against its own digests only",
                          anchored=False, model_id=model_id, logged_model_tags=tags)
    anchor = tags.get(ANCHOR_TAG)
    if not anchor:
        raise TrustError(
            f"{source.uri} has no {ANCHOR_TAG} tag in the tracking store, so its files cannot be checked "
            "against anything outside the artifact store (a model logged before anchors existed, or the "
            "tag was removed). Load it with trust='digests' (CHIMERA_TRUST=digests) only if you trust "
            "the artifact store.")
    actual = manifest_digest(flavor_conf, (mlmodel.get("flavors", {}).get("python_function") or {}).get("config"))
    if anchor != actual:
        raise TrustError(f"{source.uri}: its MLmodel (manifest sha256 {actual[:12]}…) does not match the anchor "
                         f"recorded in the tracking store ({str(anchor)[:12]}…); the artifact store was changed "
                         "after logging — refusing every variant")
    if read_now:
        tracking_reads.remember_anchor(source.uri, model_id, tags)
    return ModelTrust(policy, f"anchored: manifest matches {read_from}", anchored=True, model_id=model_id,
                      logged_model_tags=tags, anchor_read_now=read_now)


def _read_anchor(uri: str, mlmodel: dict) -> tuple[str, dict]:
    """(logged model id, its tags) from the tracking store: one bounded read of the registry
    (for ``models:/``) and one of the logged model."""
    from mlflow.tracking import MlflowClient

    model_id = _resolve_model_id(uri, mlmodel)
    try:
        logged = tracking_reads.bounded(lambda: MlflowClient().get_logged_model(model_id),
                                        f"logged model {model_id}")
    except tracking_reads.TrackingUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: no anchor can be read
        raise TrustError(f"the anchor of logged model {model_id} cannot be read from the tracking store "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not uri.startswith("models:/"):
        _check_location(uri, model_id, logged)
    return model_id, dict(logged.tags)


def _remembered(uri: str, mlmodel: dict, why: Exception) -> tuple[str, dict, str]:
    """The anchor this host read for ``uri`` before, when the tracking store is out of reach."""
    record = tracking_reads.remembered_anchor(uri)
    if record is None or record.get("model_id") != mlmodel.get("model_id"):
        raise TrustError(f"{uri} cannot be checked against its anchor: {why}; and this host has not verified "
                         "this model before (load it once while the tracking store is reachable, or "
                         "`chimera prefetch` it)") from why
    _logger.warning("chimera: %s; using the anchor of %s read at %s", why, uri, record["read_at"])
    return record["model_id"], record["tags"], (f"the {ANCHOR_TAG} tag of logged model {record['model_id']} "
                                                f"as read at {record['read_at']} (tracking store unreachable now)")


def _resolve_model_id(uri: str, mlmodel: dict) -> str:
    """The logged model id the URI names, from the tracking database (never from the artifact
    store alone); it must be the one the MLmodel names."""
    from mlflow.tracking import MlflowClient

    claimed = mlmodel.get("model_id")
    resolved = None
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):].strip("/")
        client = MlflowClient()
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = tracking_reads.bounded(lambda: client.get_model_version_by_alias(name, alias), uri)
            elif "/" in rest:
                name, number = rest.split("/", 1)
                version = tracking_reads.bounded(lambda: client.get_model_version(name, number), uri) \
                    if number.isdigit() else None
            else:
                version, resolved = None, rest  # models:/<model id>
            if version is not None:
                resolved = version.model_id or (version.source or "").removeprefix("models:/") or None
        except tracking_reads.TrackingUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TrustError(f"{uri} cannot be resolved in the tracking store ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from exc
    if resolved is None:
        if not claimed:
            raise TrustError(f"{uri}: the MLmodel names no logged model, so no anchor can be found")
        resolved = claimed
    if claimed != resolved:
        raise TrustError(f"{uri} is logged model {resolved}, but its MLmodel claims {claimed}")
    return resolved


def _check_location(uri: str, model_id: str, logged) -> None:
    """For a runs:/ or artifact-store URI: the logged model the MLmodel claims must live there."""
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        if logged.source_run_id != run_id:
            raise TrustError(f"{uri}: its MLmodel claims logged model {model_id}, which run {run_id} did not log")
    elif not uri.rstrip("/").startswith(str(logged.artifact_location).rstrip("/")):
        raise TrustError(f"{uri}: its MLmodel claims logged model {model_id}, whose artifacts are elsewhere")


# -- per variant ----------------------------------------------------------------------------------


def published_trust(entry_sig: Path | None, variant_json_sha256: str, variant_id: str, flavor_conf: dict,
                    publisher: str | None, policy: Policy) -> str:
    """How a published variant is trusted, in words; raises :class:`TrustError` if it is not."""
    if policy.level == "digests":
        return "published; trust=digests accepts it on its tag's digest"
    if entry_sig is not None and policy.public_keys:
        key = verify_variant_signature(entry_sig, variant_json_sha256, variant_id, flavor_conf, policy.public_keys)
        return f"published, signed by trusted key {key}"
    if publisher and publisher in policy.publishers:
        return f"published by {publisher}, on {PUBLISHERS_ENV}"
    raise TrustError(
        f"published by {publisher or 'an unknown publisher'} without a signature from a trusted key "
        f"(configure CHIMERA_TRUSTED_KEYS, or list the publisher in {PUBLISHERS_ENV})")


def check_sha(value, what: str) -> str:
    try:
        return check_sha256(value, what)
    except IntegrityError as exc:
        raise TrustError(str(exc)) from exc
