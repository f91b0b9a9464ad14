"""What log_model records in the tracking store besides the model's files, for a person reading
the MLflow UI: per-variant metrics, readable tags, a description and the report.

Metrics (on the run and the logged model), one *section* per measure — the UI groups metric
charts by the part of the name before ``/`` and titles each chart with the rest, so every
section compares the variants on one measure, and the metric tables list them measure by
measure::

    chimera.latency_p50_ms.batch_1/onnxruntime-fp32-cpu     p50 latency (ms) at batch 1
    chimera.latency_p99_ms.batch_1/onnxruntime-fp32-cpu     p99 latency (ms) at batch 1
    chimera.parity_max_abs_err/onnxruntime-fp32-cpu         largest absolute error vs the reference
    chimera.parity_max_rel_err/onnxruntime-fp32-cpu         largest relative error
    chimera.seconds_to_build/onnxruntime-fp32-cpu           time to build the variant
    chimera.size_mb/onnxruntime-fp32-cpu                    size of the files it loads (10^6 bytes)

The measures sort in reading order: latency, parity, then cost. Latencies are those measured on
the build host at log time (the run's host).

Tags (on the run, the logged model and the model version), short values that read without
decoding anything::

    chimera.variants                  4 variants · passed: a, b, c · failed parity: d
    chimera.status.<variant>          passed · p50 0.0487 ms at batch 1 · max abs err 3.7e-08
    chimera.fastest.<host class>      the variant ranked first on that host class
    chimera.build_host_class          where the variants were built and timed
    chimera.built_with                torch 2.13.0+cpu, onnxruntime 1.32.0, mlflow-chimera 0.1.0
    chimera.reference_sha256          identity of the reference program
    chimera.report                    where the report is
    chimera.version                   mlflow-chimera version

The run, the logged model and the model version also get a short markdown description with
the same facts (the UI's logged model page shows no tags, and the version page shows only the
first few), unless someone else wrote one: a description is rewritten only while it is empty
or starts with ``**mlflow-chimera**``.
"""

from __future__ import annotations

import logging
import time

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from mlflow_chimera import FLAVOR_NAME
from mlflow_chimera.report import (
    CHART_NAME,
    HTML_NAME,
    REPORT_DIR,
    ModelFacts,
    built_with,
    compiler_line,
    facts_from_logged_model,
    fastest_by_host_class,
    p50,
    plural,
    upload_report,
    variant_size,
)
from mlflow_chimera.manifest import RANK_BATCH
from mlflow_chimera.summary import status_word

_logger = logging.getLogger("mlflow.chimera")

TAG_PREFIX = "chimera."
MAX_TAG_VALUE = 5000  # MLflow allows 8000 characters for run tags; stay well inside
DESCRIPTION_TAG = "mlflow.note.content"
DESCRIPTION_MARK = "**mlflow-chimera**"  # a description starting with this is ours to rewrite
_BATCH_METRICS = 1000  # MLflow's limit per log_batch call
_BATCH_TAGS = 100


# -- metrics -------------------------------------------------------------------------------------


def variant_metrics(facts: ModelFacts) -> dict:
    """Metric name -> value for every variant (see the module docstring for the names)."""
    metrics = {}
    for v in facts.variants:
        bench = v.benchmark_for(facts.build_host_class)
        for batch, r in sorted((bench.latency_ms if bench else {}).items(), key=lambda kv: int(kv[0])):
            metrics[f"{TAG_PREFIX}latency_p50_ms.batch_{batch}/{v.id}"] = r["p50"]
            metrics[f"{TAG_PREFIX}latency_p99_ms.batch_{batch}/{v.id}"] = r["p99"]
        if v.parity is not None and v.parity.max_abs == v.parity.max_abs:  # NaN: no check ran
            metrics[f"{TAG_PREFIX}parity_max_abs_err/{v.id}"] = v.parity.max_abs
            metrics[f"{TAG_PREFIX}parity_max_rel_err/{v.id}"] = v.parity.max_rel
        if v.provenance.get("build_seconds") is not None:
            metrics[f"{TAG_PREFIX}seconds_to_build/{v.id}"] = v.provenance["build_seconds"]
        size, _ = variant_size(facts, v)
        if size is not None:
            metrics[f"{TAG_PREFIX}size_mb/{v.id}"] = size / 1e6
    return dict(sorted(metrics.items()))


# -- tags ----------------------------------------------------------------------------------------


def variants_tag(facts: ModelFacts) -> str:
    """``4 variants · passed: a, b · failed parity: c`` — every variant, grouped by status."""
    groups = {}
    for v in facts.variants:
        groups.setdefault(status_word(v), []).append(v.id)
    text = " · ".join([plural(len(facts.variants), "variant")] +
                      [f"{word}: {', '.join(ids)}" for word, ids in groups.items()])
    return _clip(text)


def status_tag(facts: ModelFacts, v, reason_chars: int = 300) -> str:
    """One variant in a line: status, p50 at the ranking batch on the build host, largest
    error, and why it failed."""
    parts = [status_word(v)]
    t = p50(v, facts.build_host_class)
    if t is not None:
        parts.append(f"p50 {t:.3g} ms at batch {RANK_BATCH}")
    if v.parity is not None and v.parity.max_abs == v.parity.max_abs:
        parts.append(f"max abs err {v.parity.max_abs:.2g}")
    text = " · ".join(parts)
    if v.reason:
        reason = v.reason if len(v.reason) <= reason_chars else v.reason[:reason_chars] + "…"
        text += f": {reason}"
    return _clip(text)


def variant_tags(facts: ModelFacts) -> dict:
    """The tags set on the run, the logged model and the model version (in display order)."""
    tags = {f"{TAG_PREFIX}variants": variants_tag(facts)}
    for host_class, best in fastest_by_host_class(facts).items():
        tags[f"{TAG_PREFIX}fastest.{host_class}"] = best.id
    for v in facts.variants:
        tags[f"{TAG_PREFIX}status.{v.id}"] = status_tag(facts, v)
    tags.update({
        f"{TAG_PREFIX}build_host_class": facts.build_host_class,
        f"{TAG_PREFIX}built_with": _clip(built_with(facts)),
        f"{TAG_PREFIX}reference_sha256": facts.reference_sha256,
        f"{TAG_PREFIX}report": f"{REPORT_DIR}/{HTML_NAME} and {REPORT_DIR}/{CHART_NAME} in the logged "
                               f"model's artifacts",
        f"{TAG_PREFIX}version": facts.chimera_version,
    })
    return tags


def description(facts: ModelFacts) -> str:
    """Markdown for the descriptions of the run, the logged model and the model version: which
    variants exist, which passed parity, which is fastest, what built them, where the report is."""
    counts = ", ".join(f"{n} {word}" for word, n in facts.status_counts().items())
    model = f" `{facts.model_name}`" if facts.model_name else ""
    lines = [f"{DESCRIPTION_MARK} model{model}: {plural(len(facts.variants), 'variant')} ({counts})", ""]
    for host_class, best in fastest_by_host_class(facts).items():
        where = "build host" if host_class == facts.build_host_class else "published host"
        lines.append(f"- **fastest on `{host_class}`** ({where}): **{best.id}**, "
                     f"p50 {p50(best, host_class):.3g} ms at batch {RANK_BATCH}")
    lines.append(f"- built on `{facts.build_host_class}` with {built_with(facts)}")
    for v in facts.variants:
        lines.append(f"- `{v.id}`: {status_tag(facts, v, reason_chars=160)} — built by {compiler_line(v)}")
    lines.append(f"- report: logged model{model} → Artifacts → `{REPORT_DIR}/{HTML_NAME}` "
                 f"(chart: `{REPORT_DIR}/{CHART_NAME}`)")
    return _clip("\n".join(lines))


def _ours_to_write(current: str | None) -> bool:
    """A description may be (re)written when it is empty or was written by chimera."""
    return not current or current.startswith(DESCRIPTION_MARK)


def _clip(text: str, limit: int = MAX_TAG_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- recording -----------------------------------------------------------------------------------


def record_variants(model_info, run_id: str, registered_model_name: str | None = None) -> None:
    """Write the report, then log metrics, tags and the description for a freshly logged
    chimera model (on the run, the logged model and, if registered, the model version)."""
    client = MlflowClient()
    facts = facts_from_logged_model(model_info.model_id, flavor_conf=model_info.flavors[FLAVOR_NAME],
                                    client=client)
    try:
        upload_report(facts, client)
    except Exception as exc:  # noqa: BLE001 - the model is logged; a missing report must not undo it
        _logger.warning("chimera: could not write the report for %s: %s", model_info.model_id, exc)
    version = model_info.registered_model_version
    record_facts(client, facts, run_id=run_id, model_id=model_info.model_id,
                 model_version=(registered_model_name, str(version))
                 if registered_model_name and version is not None else None)


def record_facts(client, facts: ModelFacts, run_id: str | None = None, model_id: str | None = None,
                 model_version: tuple | None = None) -> None:
    """Log ``facts`` as metrics (run, logged model), tags (run, logged model, model version
    ``(name, version)``) and descriptions (each of the three, unless someone else wrote one).
    Safe to call again after variants were added: values are overwritten, metrics get a new
    point."""
    tags = variant_tags(facts)
    text = description(facts)
    if run_id is not None:
        run_tags = dict(tags)
        if _ours_to_write(client.get_run(run_id).data.tags.get(DESCRIPTION_TAG)):
            run_tags[DESCRIPTION_TAG] = text
        _log_run(client, run_id, model_id, variant_metrics(facts), run_tags)
    if model_id is not None:
        model_tags = dict(tags)
        if _ours_to_write(client.get_logged_model(model_id).tags.get(DESCRIPTION_TAG)):
            model_tags[DESCRIPTION_TAG] = text
        client.set_logged_model_tags(model_id, model_tags)
    if model_version is not None:
        name, version = model_version
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if _ours_to_write(client.get_model_version(name, version).description):
            client.update_model_version(name, version, description=text)


def _log_run(client, run_id: str, model_id: str | None, metrics: dict, tags: dict) -> None:
    """Metrics (linked to the logged model) and tags on the run, in MLflow's batch sizes."""
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()]
    for i in range(0, len(entries), _BATCH_METRICS):
        client.log_batch(run_id, metrics=entries[i:i + _BATCH_METRICS])
    run_tags = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(run_tags), _BATCH_TAGS):
        client.log_batch(run_id, tags=run_tags[i:i + _BATCH_TAGS])
