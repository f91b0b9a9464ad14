"""The variant catalog of one model: every record a loader may consider, each checked once.

Records come from the model directory (each ``variant.json`` against its digest in MLmodel),
from target hosts' publications (``chimera.variant.<id>`` tags, read only when the model was
reached through the tracking store) and from host benchmarks stored after logging. Every id,
path and location in them is validated; each record's problems refuse that record only, with
the reason kept for ``explain()``; trust (:mod:`mlflow_chimera.trust`) decides which records
count at all.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_chimera import backends as backend_registry
from mlflow_chimera import remembered_models
from mlflow_chimera import trust as trust_mod
from mlflow_chimera.backends.base import LoadContext
from mlflow_chimera.manifest import (
    CHECK_INPUTS,
    CHECK_OUTPUTS,
    VARIANT_FILE,
    IntegrityError,
    Variant,
    check_variant_id,
    read_mlmodel,
    sha256_file,
    variant_dir,
    verify_digests,
)
from mlflow_chimera.reference import Signature

_logger = logging.getLogger("mlflow.chimera")

PUBLISHED_TAG_PREFIX = "chimera.variant."
PAYLOAD_ROOT = "chimera"
_RUN_ID = r"[A-Za-z0-9_-]{1,64}"
_VARIANT_LOCATION = re.compile(rf"runs:/({_RUN_ID})/{PAYLOAD_ROOT}/variants/([a-z0-9_.+-]+)")
_REFERENCE_LOCATION = re.compile(rf"runs:/({_RUN_ID})/{PAYLOAD_ROOT}/reference/program\.pt2")


@dataclass
class Catalog:
    """What a loader may choose from, and why everything else is out."""

    variants: list  # [Variant] that count
    refused: dict  # variant id -> reason (bad record, untrusted, unverifiable)
    context: LoadContext
    trust: trust_mod.ModelTrust
    how_trusted: dict = field(default_factory=dict)  # variant id -> in words


def published_entries(tags: dict) -> tuple[dict, dict]:
    """({variant id: entry}, {tag key: why malformed}) from ``chimera.variant.<id>`` tags. One
    malformed tag loses only itself."""
    entries, malformed = {}, {}
    for key, value in tags.items():
        if not key.startswith(PUBLISHED_TAG_PREFIX):
            continue
        vid = key[len(PUBLISHED_TAG_PREFIX):]
        try:
            check_variant_id(vid)
            entry = json.loads(value)
            if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str):
                raise ValueError("expected a JSON object with 'uri' and 'variant_json_sha256'")
            trust_mod.check_sha(entry.get("variant_json_sha256"), "variant_json_sha256")
            check_location(entry["uri"], vid)
        except (ValueError, IntegrityError, trust_mod.TrustError) as exc:
            malformed[vid if "/" not in vid else key] = f"published tag is malformed: {exc}"
            continue
        entries[vid] = entry
    return entries, malformed


def check_location(uri: str, variant_id: str, run_id: str | None = None) -> str:
    """A variant's files must be at ``runs:/<run>/chimera/variants/<its id>`` — in the tracking
    server's artifact store, in the run that logged (or published) it."""
    match = _VARIANT_LOCATION.fullmatch(uri or "")
    if not match or match.group(2) != variant_id or (run_id is not None and match.group(1) != run_id):
        where = f"runs:/{run_id or '<run>'}/{PAYLOAD_ROOT}/variants/{variant_id}"
        raise IntegrityError(f"variant {variant_id}: location {str(uri)[:120]!r} is not allowed; expected {where}")
    return uri


def _reference_uri(flavor_conf: dict, run_id: str | None) -> str | None:
    uri = flavor_conf["reference"].get("uri")
    if uri is None:
        return None
    match = _REFERENCE_LOCATION.fullmatch(str(uri))
    if not match or (run_id is not None and match.group(1) != run_id):
        raise IntegrityError(f"reference program location {str(uri)[:120]!r} is not allowed; expected "
                             f"runs:/{run_id or '<run>'}/{PAYLOAD_ROOT}/reference/program.pt2")
    return uri


def verify_checks(model_dir: Path, flavor_conf: dict) -> None:
    """The check files (the example and the reference's outputs for it) against the digests
    in the manifest, before a loader compares anything with them."""
    digests = flavor_conf.get("checks") or {}
    expected = {rel: digests[key] for key, rel in (("inputs", CHECK_INPUTS), ("outputs", CHECK_OUTPUTS))
                if key in digests}
    verify_digests(model_dir, expected)


def _mlmodel(model_dir: Path) -> dict:
    return read_mlmodel(model_dir)


def read_catalog(model_dir, flavor_conf: dict, policy: trust_mod.Policy | None = None,
                 source: trust_mod.Source | None = None, include_published: bool | None = None) -> Catalog:
    """The catalog of the model at ``model_dir`` for a loader with ``policy`` that reached it
    through ``source``. Raises :class:`~mlflow_chimera.trust.TrustError` when the model as a
    whole is refused."""
    model_dir = Path(model_dir)
    policy = policy or trust_mod.Policy.from_settings()
    source = source or trust_mod.Source(None)
    mlmodel = _mlmodel(model_dir)
    model_trust = trust_mod.check_model(mlmodel, flavor_conf, source, policy)
    if model_trust.anchored and model_trust.anchor_read_now:
        remembered_models.remember(source.uri, model_dir)
    run_id = mlmodel.get("run_id")
    context = LoadContext(model_dir=model_dir, signature=Signature.from_dict(flavor_conf["signature"]),
                          reference_sha256=trust_mod.check_sha(flavor_conf["reference"]["sha256"], "reference sha256"),
                          reference_uri=_reference_uri(flavor_conf, run_id),
                          reference_size=flavor_conf["reference"].get("size_bytes"))
    variants, refused, how = [], {}, {}
    for vid, entry in flavor_conf["variants"].items():
        try:
            variant = Variant.load(variant_dir(model_dir, vid), expected_sha256=entry["variant_json_sha256"])
            if variant.id != vid:
                raise IntegrityError(f"variant.json of {vid} names itself {variant.id!r}")
            if variant.location is not None:
                check_location(variant.location, vid, run_id)
            _gate_native(variant, variant_dir(model_dir, vid) / trust_mod.SIGNATURE_FILE,
                         entry["variant_json_sha256"], flavor_conf, model_trust)
        except (IntegrityError, trust_mod.TrustError, OSError, ValueError, KeyError, TypeError) as exc:
            refused[str(vid)[:80]] = f"refused: {exc}"
            continue
        variants.append(variant)
        how[vid] = model_trust.how
    if include_published if include_published is not None else source.tracked:
        _add_published(variants, refused, how, flavor_conf, model_trust, mlmodel)
    _merge_host_benchmarks(variants, model_dir, model_trust, local=not source.tracked)
    return Catalog(variants, refused, context, model_trust, how)


def _gate_native(variant: Variant, signature_path: Path, variant_json_sha256: str, flavor_conf: dict,
                 model_trust: trust_mod.ModelTrust) -> None:
    """Under ``trust="signed"``, native code only with a trusted signature."""
    if model_trust.policy.level != "signed" or not _native_code(variant):
        return
    if not model_trust.policy.public_keys:
        raise trust_mod.TrustError("trust=signed: native code needs a signature from a trusted key, and no "
                                   "trusted keys are configured (CHIMERA_TRUSTED_KEYS)")
    trust_mod.verify_variant_signature(signature_path, variant_json_sha256, variant.id, flavor_conf,
                                       model_trust.policy.public_keys)


def _native_code(variant: Variant) -> bool:
    try:
        return bool(getattr(backend_registry.get(variant.backend), "native_code", False))
    except backend_registry.UnknownBackendError:
        return True  # refused later by selection; never treated as harmless


def _add_published(variants: list, refused: dict, how: dict, flavor_conf: dict,
                   model_trust: trust_mod.ModelTrust, mlmodel: dict) -> None:
    """Variants target hosts published for this logged model, each only if trusted."""
    tags = model_trust.logged_model_tags
    if not tags and mlmodel.get("model_id"):
        tags = _read_tags(mlmodel["model_id"])
    entries, malformed = published_entries(tags)
    refused.update(malformed)
    known = {v.id for v in variants} | set(flavor_conf["variants"])
    for vid, entry in sorted(entries.items()):
        if vid in known:
            continue
        try:
            variant, signature = _fetch_published(vid, entry)
            words = trust_mod.published_trust(signature, entry["variant_json_sha256"], vid, flavor_conf,
                                              entry.get("publisher"), model_trust.policy)
        except (IntegrityError, trust_mod.TrustError, OSError, ValueError, KeyError, TypeError) as exc:
            refused[vid] = f"refused published variant: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - a store error loses this record only
            refused[vid] = f"published variant not readable: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        variants.append(variant)
        how[vid] = words


def _fetch_published(vid: str, entry: dict) -> tuple[Variant, Path | None]:
    from mlflow_chimera.cache import fetch_file

    path = fetch_file(f"{entry['uri']}/{VARIANT_FILE}", entry["variant_json_sha256"], VARIANT_FILE,
                      kind="variant-records")
    variant = Variant.load(path.parent)
    if variant.id != vid:
        raise IntegrityError(f"published record for {vid} names itself {variant.id!r}")
    check_location(variant.location, vid)
    if variant.location != entry["uri"]:
        raise IntegrityError(f"published record for {vid} points at {variant.location}, its tag at {entry['uri']}")
    signature = None
    try:
        import mlflow

        with_sig = Path(path.parent, trust_mod.SIGNATURE_FILE)
        if not with_sig.is_file():
            mlflow.artifacts.download_artifacts(artifact_uri=f"{entry['uri']}/{trust_mod.SIGNATURE_FILE}",
                                                dst_path=str(path.parent))
        signature = with_sig if with_sig.is_file() else None
    except Exception:  # noqa: BLE001 - no signature published: trust decides what that means
        signature = None
    return variant, signature


def _read_tags(model_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    from mlflow_chimera.tracking_reads import bounded

    try:
        return dict(bounded(lambda: MlflowClient().get_logged_model(model_id), f"logged model {model_id}").tags)
    except Exception as exc:  # noqa: BLE001 - published variants are an addition, never a must
        _logger.warning("chimera: published variants of %s not read: %s: %s", model_id, type(exc).__name__, exc)
        return {}


def _merge_host_benchmarks(variants: list, model_dir: Path, model_trust: trust_mod.ModelTrust, local: bool) -> None:
    """Add host benchmarks stored after logging, where trust lets them steer ranking. A stored
    benchmark replaces, whole, a variant's figures recorded earlier for the same host class:
    figures from two measurements (other runs, threads, noise) are never mixed in one record."""
    from mlflow_chimera.manifest import BENCHMARKS_DIR, Benchmark

    for path in sorted(Path(model_dir, BENCHMARKS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            host_class = str(record["host_class"])
            if not model_trust.benchmark_usable(host_class, sha256_file(path), local):
                _logger.warning("chimera: host benchmarks in %s are not anchored; they do not steer ranking", path.name)
                continue
            per_variant = {vid: dict(entry["latency_ms"]) for vid, entry in record["variants"].items()}
            how = {"threads": dict(record.get("threads") or {}), "method": str(record.get("method") or ""),
                   "measured_at": str(record.get("measured_at") or "")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a malformed file only loses its own figures
        for v in variants:
            if v.id in per_variant:
                v.benchmarks = [b for b in v.benchmarks if b.host_class != host_class]
                v.benchmarks.append(Benchmark(host_class, per_variant[v.id], tool="chimera.benchmark", **how))
