"""Compile a logged model on a target host and publish the new variants to the same model.

    from mlflow_chimera.publish import compile_model
    compile_model("models:/clf@prod", backends=["aotinductor"])

The target host downloads only the MLmodel, the example checks and the reference program, runs
the same pipeline as ``log_model`` (isolated build → parity → benchmark → provenance) for what
it can build, and publishes each new variant:

* its files go to the artifacts of a new run in the model's experiment ("chimera compile
  <host class>"), under ``chimera/variants/<id>/`` — a location no other publisher writes;
* it is announced by one tag per variant on the logged model, mirrored on every model version
  that points at it: ``chimera.variant.<id>`` = ``{"uri", "variant_json_sha256", …}``. Tags are
  independent keys, so concurrent publishers of different variants never overwrite each other,
  and the digest in the registry is the trust anchor for the files in the artifact store.

No new model version is needed: loaders of any version of this model see published variants.
Compiling again is idempotent: variants whose id the model already has are skipped.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow_chimera import FLAVOR_NAME
from mlflow_chimera.catalog import PAYLOAD_ROOT, PUBLISHED_TAG_PREFIX, published_entries


def read_published_variants(model_id: str, known_ids=()) -> list:
    """Variant records published for ``model_id``, each ``variant.json`` checked against the
    digest in its tag (for reports: loaders go through the catalog, which also checks trust).
    Ids in ``known_ids`` and malformed tags are skipped."""
    from mlflow.tracking import MlflowClient

    from mlflow_chimera.catalog import _fetch_published

    entries, _ = published_entries(MlflowClient().get_logged_model(model_id).tags)
    return [_fetch_published(vid, entry)[0] for vid, entry in sorted(entries.items()) if vid not in known_ids]


def resolve_model(model_uri: str):
    """(MLflow Model, logged model id) for a ``models:/`` (name/version, name@alias, model id)
    or ``runs:/`` URI; downloads only MLmodel."""
    from mlflow.models import Model

    model = Model.load(model_uri)
    model_id = getattr(model, "model_id", None)
    if not model_id:
        raise ValueError(f"{model_uri} is not a logged model (no model id in its MLmodel); "
                         "compile needs a model logged to a tracking store")
    if FLAVOR_NAME not in model.flavors:
        raise ValueError(f"{model_uri} is not a chimera model (flavors: {sorted(model.flavors)})")
    return model, model_id


def compile_model(model_uri: str, backends=None, precisions=None, tolerances: dict | None = None,
                  benchmark: dict | None = None, build_timeout: float | None = None,
                  force: bool = False, progress=None, signing_key_path: str | None = None) -> dict:
    """Build, check, time and publish the variants this host can build for a logged model.

    Each ready variant is signed with ``signing_key_path`` (default ``$CHIMERA_SIGNING_KEY``):
    loaders count a published variant only when it is signed by a key they trust, or when its
    publisher is on their allow-list (see ``trust.py``).

    Returns ``{"model_id", "run_id", "host_class", "published": [ids], "skipped": {id: why},
    "variants": {id: {"status", "reason", "p50_ms"}}}``.
    """
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from mlflow_chimera import host as host_mod
    from mlflow_chimera.backends.base import LoadContext
    from mlflow_chimera.backends.torch_runner import TorchRunner
    from mlflow_chimera.compile.pipeline import (DEFAULT_PRECISIONS, build_variants, check_request,
                                                 resolve_backends)
    from mlflow_chimera.manifest import CHECK_INPUTS, REFERENCE_PROGRAM
    from mlflow_chimera.reference import Signature, load_program
    from mlflow_chimera.signing import signing_key

    check_request(backends, precisions)
    say = progress or (lambda message: None)
    model, model_id = resolve_model(model_uri)
    conf = model.flavors[FLAVOR_NAME]
    client = MlflowClient()
    logged_model = client.get_logged_model(model_id)
    existing = set(conf["variants"]) | set(published_entries(logged_model.tags)[0])
    host = host_mod.fingerprint()
    chosen, _ = resolve_backends(backends)
    wanted = [plan.id for _, backend in chosen for plan in backend.plan(list(precisions or DEFAULT_PRECISIONS), host)]
    skipped = {vid: "already in the model" for vid in wanted if vid in existing and not force}
    if len(skipped) == len(wanted):
        return {"model_id": model_id, "run_id": None, "host_class": host.host_class,
                "published": [], "skipped": skipped, "variants": {}}

    signature = Signature.from_dict(conf["signature"])
    with tempfile.TemporaryDirectory(prefix="chimera-compile-") as work:
        work = Path(work)
        say("fetching the reference program")
        checks = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/{CHECK_INPUTS}", dst_path=str(work))
        with np.load(checks, allow_pickle=False) as data:
            example = {k: data[k] for k in data.files}
        context = LoadContext(model_dir=work, signature=signature, reference_sha256=conf["reference"]["sha256"],
                              reference_uri=conf["reference"].get("uri") or f"{model_uri}/{REFERENCE_PROGRAM}")
        program_path = context.reference_path()
        reference_module = load_program(program_path, context.reference_sha256).module()
        new, _ = build_variants(
            model_dir=work, program_path=program_path, reference_sha256=context.reference_sha256,
            signature=signature, example=example, reference_fn=TorchRunner(reference_module, signature).run,
            backends=[name for name, _ in chosen], precisions=precisions, tolerances=tolerances,
            benchmark=benchmark, build_timeout=build_timeout, progress=say, skip_ids=set(skipped),
        )
        run_id = _publish(client, logged_model, work, new, host, say, conf, signing_key(signing_key_path))
    _refresh_facts(client, model_id, conf, new, run_id, host)
    return {
        "model_id": model_id,
        "run_id": run_id,
        "host_class": host.host_class,
        "published": [v.id for v in new],
        "skipped": skipped,
        "variants": {v.id: {"status": v.status, "reason": v.reason,
                            "p50_ms": {b: r["p50"] for b, r in (v.benchmarks[0].latency_ms.items()
                                                                 if v.benchmarks else [])}}
                     for v in new},
    }


def _publish(client, logged_model, work: Path, variants: list, host, say, conf: dict, key) -> str:
    """Upload each variant (signed when a signing key is configured) to a new run's artifacts
    and announce it with a tag on the logged model and its model versions. Returns the run id."""
    from mlflow_chimera.manifest import READY, variant_dir
    from mlflow_chimera.signing import key_id
    from mlflow_chimera.trust import sign_variant

    model_facts = {"reference": conf["reference"], "checks": conf.get("checks", {}), "signature": conf["signature"]}

    run = client.create_run(logged_model.experiment_id, run_name=f"chimera compile {host.host_class}",
                            tags={"chimera.compiled_for_model": logged_model.model_id,
                                  "chimera.host_class": host.host_class})
    run_id = run.info.run_id
    tags = {}
    try:
        for v in variants:
            vdir = variant_dir(work, v.id)
            artifact_path = f"{PAYLOAD_ROOT}/variants/{v.id}"
            v.location = f"runs:/{run_id}/{artifact_path}"
            digest = v.save(vdir)
            say(f"publishing {v.id} ({v.status})")
            if key is not None and v.status == READY:
                sign_variant(vdir, v.id, model_facts, key)
            client.log_artifacts(run_id, str(vdir), artifact_path=artifact_path)
            tags[f"{PUBLISHED_TAG_PREFIX}{v.id}"] = json.dumps({
                "uri": v.location, "variant_json_sha256": digest, "status": v.status,
                "host_class": host.host_class, "backend": v.backend, "precision": v.precision,
                "publisher": run.info.user_id, "signed_by": key_id(key) if key is not None else None,
            }, sort_keys=True)
        # Files first, then the announcements: a loader never sees a tag whose files are missing.
        client.set_logged_model_tags(logged_model.model_id, tags)
        for version in _versions_of(client, logged_model):
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, value)
        client.set_terminated(run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def _refresh_facts(client, model_id: str, conf: dict, new: list, run_id: str, host) -> None:
    """Rewrite the report, tags and descriptions of the model (and its versions) to include the
    published variants, and record the new variants' figures on the compile run."""
    import dataclasses
    import logging

    from mlflow_chimera.report import refresh_report
    from mlflow_chimera.tracking import record_facts

    try:
        published = read_published_variants(model_id, known_ids=set(conf["variants"]))
        facts = refresh_report(model_id, extra_variants=published, flavor_conf=conf, client=client)
        record_facts(client, facts, model_id=model_id)
        for version in _versions_of(client, client.get_logged_model(model_id)):
            record_facts(client, facts, model_version=(version.name, str(version.version)))
        record_facts(client, dataclasses.replace(facts, variants=new, build_host_class=host.host_class),
                     run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - the variants are published; the summary is extra
        logging.getLogger("mlflow.chimera").warning(
            "chimera: published, but the report/tags of %s were not refreshed: %s", model_id, exc)


def _versions_of(client, logged_model) -> list:
    """Model versions that point at ``logged_model``."""
    if not logged_model.source_run_id:
        return []
    versions = client.search_model_versions(f"run_id = '{logged_model.source_run_id}'")
    # A version's model_id is not always filled in by the store; its source names the model.
    return [mv for mv in versions if getattr(mv, "model_id", None) == logged_model.model_id
            or mv.source == f"models:/{logged_model.model_id}"]
