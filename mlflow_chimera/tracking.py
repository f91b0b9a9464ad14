"""What log_model records in the tracking store besides artifacts: per-variant metrics and the
key facts as tags, on the run, the logged model and the registered model version."""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mlflow_chimera.manifest import READY
from mlflow_chimera.selection import RANK_BATCH

TAG_PREFIX = "chimera."
MAX_TAG_VALUE = 5000  # conservative: MLflow allows 8000 characters for run tags


def variant_metrics(flavor_conf: dict) -> dict:
    """``chimera.<variant>.p50_ms.batch_<n>`` (and p99) and parity errors, per variant measured."""
    metrics = {}
    for vid, entry in flavor_conf["variants"].items():
        for stat in ("p50_ms", "p99_ms"):
            for batch, value in entry.get(stat, {}).items():
                metrics[f"{TAG_PREFIX}{vid}.{stat}.batch_{batch}"] = value
        for key in ("parity_max_abs", "parity_max_rel"):
            if key in entry and entry[key] == entry[key]:  # skip NaN (no check ran)
                metrics[f"{TAG_PREFIX}{vid}.{key}"] = entry[key]
    return metrics


def fastest_ready(flavor_conf: dict) -> str | None:
    """The ready variant with the lowest p50 at the ranking batch, as measured at log time."""
    ready = [(e["p50_ms"][str(RANK_BATCH)], vid) for vid, e in flavor_conf["variants"].items()
             if e["status"] == READY and str(RANK_BATCH) in e.get("p50_ms", {})]
    return min(ready)[1] if ready else None


def variant_tags(flavor_conf: dict) -> dict:
    statuses = ", ".join(f"{vid}: {e['status']}" for vid, e in flavor_conf["variants"].items())
    tags = {
        f"{TAG_PREFIX}reference_sha256": flavor_conf["reference"]["sha256"],
        f"{TAG_PREFIX}build_host_class": flavor_conf["build_host_class"],
        f"{TAG_PREFIX}variants": statuses[:MAX_TAG_VALUE],
        f"{TAG_PREFIX}version": flavor_conf["chimera_version"],
    }
    if best := fastest_ready(flavor_conf):
        tags[f"{TAG_PREFIX}fastest.{flavor_conf['build_host_class']}"] = best
    return tags


def record_variants(model_info, run_id: str, registered_model_name: str | None = None) -> None:
    """Log metrics and tags for a freshly logged chimera model."""
    conf = model_info.flavors["chimera"]
    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0, model_id=model_info.model_id)
               for k, v in variant_metrics(conf).items()]
    tags = variant_tags(conf)
    client.log_batch(run_id, metrics=metrics)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_logged_model_tags(model_info.model_id, tags)
    if registered_model_name and model_info.registered_model_version is not None:
        version = str(model_info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, version, key, value)

