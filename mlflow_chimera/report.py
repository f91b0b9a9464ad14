"""The chimera report: what a person sees about a model's variants in the MLflow UI.

Two files, written into the logged model's artifacts under ``report/`` at log time and
rewritten whenever variants are added (:func:`refresh_report`):

* ``report/chimera-report.html`` — a self-contained page (inline CSS, the chart embedded as a
  ``data:`` image, no scripts, fonts or external URLs), opened by the UI's HTML viewer: which
  variants exist, which passed parity, which is fastest on each host class, what built them;
  then the variant table (backend, precision, target, parity, latency, size, provenance).
* ``report/chimera-latency.png`` — p50 latency per variant and batch size, one panel per host
  class, with parity-failed variants hatched and marked in red; the UI shows it inline.

Everything is read from the model itself: the ``chimera`` flavor in ``MLmodel`` and each
``variants/<id>/variant.json`` (checked against the digest MLmodel records for it). The same
:class:`ModelFacts` feed the tags and metrics in :mod:`mlflow_chimera.tracking`.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow_chimera
from mlflow_chimera import FLAVOR_NAME
from mlflow_chimera.manifest import (
    BUILD_FAILED,
    FAILED_PARITY,
    RANK_BATCH,
    READY,
    REFERENCE_PROGRAM,
    VARIANTS_DIR,
    VARIANT_FILE,
    Variant,
    read_mlmodel,
    sha256_file,
)
from mlflow_chimera.summary import status_word

REPORT_DIR = "report"
HTML_NAME = "chimera-report.html"
CHART_NAME = "chimera-latency.png"



@dataclass
class ModelFacts:
    """What the report, the tags and the metrics say about one chimera model."""

    reference_sha256: str
    build_host_class: str
    chimera_version: str
    variants: list  # [Variant]: MLmodel's order, then variants added later
    sizes: dict = field(default_factory=dict)  # variant id -> bytes of the files it loads
    reference_size: int | None = None  # bytes of reference/program.pt2
    skipped_backends: dict = field(default_factory=dict)  # backend -> why it was not built
    warnings: list = field(default_factory=list)  # e.g. a variant.json whose digest differs
    model_id: str | None = None
    model_name: str | None = None

    def host_classes(self) -> list:
        """Every host class some variant was timed on; the build host's first."""
        seen = [self.build_host_class]
        for v in self.variants:
            seen += [b.host_class for b in v.benchmarks if b.host_class not in seen]
        return [h for h in seen if any(v.benchmark_for(h) for v in self.variants)]

    def status_counts(self) -> dict:
        """``{"passed": n, "failed parity": n, "build failed": n}`` (zero counts left out)."""
        counts = {}
        for v in self.variants:
            word = status_word(v)
            counts[word] = counts.get(word, 0) + 1
        return counts


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def p50(variant: Variant, host_class: str, batch: int = RANK_BATCH) -> float | None:
    bench = variant.benchmark_for(host_class)
    return bench.p50(batch) if bench else None


def fastest(variants: list, host_class: str) -> Variant | None:
    """The parity-passed variant with the lowest p50 at the ranking batch on ``host_class``
    (the one selection ranks first there, when it can run)."""
    timed = [(p50(v, host_class), v.id, v) for v in variants
             if v.status == READY and p50(v, host_class) is not None]
    return min(timed)[2] if timed else None


def fastest_by_host_class(facts: ModelFacts) -> dict:
    """``{host class: fastest variant}`` for every host class with timings."""
    return {h: best for h in facts.host_classes() if (best := fastest(facts.variants, h))}


# -- reading a model's facts ----------------------------------------------------------------


def facts_from_flavor(flavor_conf: dict, variants: list, **extra) -> ModelFacts:
    """Combine the ``chimera`` flavor of MLmodel with the model's variant records."""
    return ModelFacts(
        reference_sha256=flavor_conf["reference"]["sha256"],
        build_host_class=flavor_conf["build_host_class"],
        chimera_version=flavor_conf.get("chimera_version", mlflow_chimera.__version__),
        variants=list(variants),
        skipped_backends=dict(flavor_conf.get("skipped_backends") or {}),
        **extra,
    )


def facts_from_dir(model_dir, model_id: str | None = None, model_name: str | None = None) -> ModelFacts:
    """Facts of a chimera model directory on local disk (e.g. one written by ``save_model``)."""
    model_dir = Path(model_dir)
    conf = read_mlmodel(model_dir)["flavors"][FLAVOR_NAME]
    warnings = []
    variants = [_checked_variant(model_dir / VARIANTS_DIR / vid / VARIANT_FILE, entry, warnings)
                for vid, entry in conf["variants"].items()]
    return _with_sizes(conf, variants, str(model_dir.resolve()), warnings=warnings,
                       model_id=model_id, model_name=model_name)


def facts_from_logged_model(model_id: str, flavor_conf: dict | None = None, extra_variants=(),
                            client=None) -> ModelFacts:
    """Facts of a logged model, read through the tracking server: MLmodel (unless
    ``flavor_conf`` is given), each ``variant.json`` and artifact listings (for sizes).

    ``extra_variants`` are :class:`Variant` records added after logging (e.g. built on another
    host); one with the id of an existing variant replaces it.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    logged = client.get_logged_model(model_id)
    with tempfile.TemporaryDirectory(prefix="chimera-report-") as tmp:
        if flavor_conf is None:
            flavor_conf = _download_flavor(logged.artifact_location, tmp)
        variants, warnings = [], []
        for vid, entry in flavor_conf["variants"].items():
            local = _download(logged.artifact_location, f"{VARIANTS_DIR}/{vid}/{VARIANT_FILE}", tmp)
            variants.append(_checked_variant(local, entry, warnings))
    return _with_sizes(flavor_conf, _merge(variants, extra_variants), logged.artifact_location,
                       warnings=warnings, model_id=model_id, model_name=logged.name)


def _with_sizes(flavor_conf: dict, variants: list, model_uri: str, **extra) -> ModelFacts:
    """Facts with the size of each variant's files and of the reference program, listed where
    they are: in the model (``model_uri``) or, if a record says so, at its own location."""
    sizes = {}
    for v in variants:
        location = getattr(v, "location", None) or f"{model_uri}/{VARIANTS_DIR}/{v.id}"
        sizes[v.id] = _tree_bytes(location, skip=VARIANT_FILE)
    reference = flavor_conf.get("reference") or {}
    reference_uri = reference.get("uri") or f"{model_uri}/{reference.get('path', REFERENCE_PROGRAM)}"
    return facts_from_flavor(flavor_conf, variants, sizes=sizes, reference_size=_file_bytes(reference_uri),
                             **extra)


def _download(artifact_location: str, path: str, dst: str) -> Path:
    """Download one small file, without MLflow's progress bar (a bar per file is noise here)."""
    import mlflow

    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    if quiet:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_location}/{path}",
                                                        dst_path=dst))
    finally:
        if quiet:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)


def _download_flavor(artifact_location: str, dst: str) -> dict:
    return read_mlmodel(_download(artifact_location, "MLmodel", dst))["flavors"][FLAVOR_NAME]


def _checked_variant(path: Path, summary: dict, warnings: list) -> Variant:
    """Read a variant.json; note (in ``warnings``) a digest that differs from MLmodel's."""
    expected = summary.get("variant_json_sha256")
    if expected and sha256_file(path) != expected:
        warnings.append(f"{path.parent.name}/{VARIANT_FILE} does not match the digest recorded in "
                        f"MLmodel; loaders will refuse this variant")
    return Variant.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _merge(variants: list, extra) -> list:
    by_id = {v.id: v for v in variants}
    for v in extra:
        by_id[v.id] = v
    return list(by_id.values())


def _list(uri: str) -> list | None:
    import mlflow

    try:
        return mlflow.artifacts.list_artifacts(artifact_uri=uri)
    except Exception:  # noqa: BLE001 - sizes are informative; a store that cannot list is fine
        return None


def _tree_bytes(uri: str, skip: str | None = None) -> int | None:
    """Total size of the files under an artifact URI or a local directory, leaving out files
    named ``skip``; None when it cannot be listed."""
    infos = _list(uri)
    if infos is None:
        return None
    total = 0
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if info.is_dir:
            total += _tree_bytes(f"{uri}/{name}", skip) or 0
        elif name != skip:
            total += info.file_size or 0
    return total


def _file_bytes(uri: str) -> int | None:
    """Size of one file at an artifact URI or local path; None when it is not there."""
    parent, name = uri.rsplit("/", 1)
    for info in _list(parent) or []:
        if info.path.rsplit("/", 1)[-1] == name and not info.is_dir:
            return info.file_size
    return None


def variant_size(facts: ModelFacts, variant: Variant) -> tuple[int | None, bool]:
    """(bytes the variant loads, whether that is the reference program it runs)."""
    own = facts.sizes.get(variant.id)
    if variant.status == BUILD_FAILED:
        return None, False
    if not own and (not variant.files or variant.provenance.get("uses_reference")):
        return facts.reference_size, True
    return own, False


# -- writing the report ---------------------------------------------------------------------


def write_report(facts: ModelFacts, out_dir) -> list:
    """Write ``chimera-latency.png`` and ``chimera-report.html`` into ``out_dir``; return their
    paths (chart first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = out_dir / CHART_NAME
    render_chart(facts, chart)
    page = out_dir / HTML_NAME
    page.write_text(render_html(facts, chart.read_bytes()), encoding="utf-8")
    return [chart, page]


def refresh_report(model_id: str, extra_variants=(), flavor_conf: dict | None = None,
                   client=None) -> ModelFacts:
    """(Re)write the report of a logged model and upload it to its ``report/`` artifacts.

    Call it after variants were added to the model (pass the new :class:`Variant` records as
    ``extra_variants`` if they are not listed in MLmodel); the previous report is replaced.
    Returns the facts it was written from.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    facts = facts_from_logged_model(model_id, flavor_conf, extra_variants, client)
    upload_report(facts, client)
    return facts


def upload_report(facts: ModelFacts, client) -> None:
    """Write the report for ``facts`` and upload it to the logged model's ``report/``."""
    with tempfile.TemporaryDirectory(prefix="chimera-report-") as tmp:
        write_report(facts, tmp)
        client.log_model_artifacts(facts.model_id, tmp, REPORT_DIR)


# -- the chart -------------------------------------------------------------------------------

_BATCH_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
_FAILED_COLOR = "#d62728"


def chart_order(facts: ModelFacts, host_class: str) -> list:
    """Variants in the order a person reads them: passed (fastest first), failed parity, then
    build failed; unmeasured ones after measured ones of the same status."""
    status_rank = {READY: 0, FAILED_PARITY: 1, BUILD_FAILED: 2}

    def key(v):
        t = p50(v, host_class)
        return (status_rank.get(v.status, 3), t is None, t or 0.0, v.id)

    return sorted(facts.variants, key=key)


def render_chart(facts: ModelFacts, path) -> None:
    """PNG: one horizontal bar panel per host class, a bar per variant and batch size (p50);
    parity-failed variants are hatched and labelled in red, build failures labelled."""
    # matplotlib's object API with its own Agg canvas: pyplot would switch (or need) the
    # process-wide backend, which in a notebook is the user's, not ours.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    host_classes = facts.host_classes() or [facts.build_host_class]
    panels = [(h, _panel_variants(facts, h)) for h in host_classes]
    heights = [0.55 * max(1, len(variants)) + 1.4 for _, variants in panels]
    fig = Figure(figsize=(10, 0.4 + sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (host_class, variants) in zip(axes[:, 0], panels):
        _draw_panel(ax, facts, host_class, variants)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _batches(variants: list, host_class: str) -> list:
    return sorted({int(b) for v in variants if (bench := v.benchmark_for(host_class))
                   for b in bench.latency_ms}) or [RANK_BATCH]


def _panel_variants(facts: ModelFacts, host_class: str) -> list:
    """Every variant on the build host's panel; on another host's, only those timed there."""
    variants = chart_order(facts, host_class)
    if host_class != facts.build_host_class:
        variants = [v for v in variants if v.benchmark_for(host_class)]
    return variants


def _draw_panel(ax, facts: ModelFacts, host_class: str, variants: list) -> None:
    from matplotlib.patches import Patch

    variants = list(reversed(variants))  # barh draws bottom-up
    batches = _batches(variants, host_class)
    height = 0.8 / len(batches)
    best = fastest(facts.variants, host_class)
    values = [r["p50"] for v in variants if (bench := v.benchmark_for(host_class))
              for r in bench.latency_ms.values() if r["p50"] > 0] or [1.0]
    top, log = max(values), max(values) / min(values) > 30  # log scale when bars would vanish
    base = min(values) / 3 if log else 0.0
    for row, v in enumerate(variants):
        bench = v.benchmark_for(host_class)
        failed = v.status != READY
        for i, batch in enumerate(batches):
            r = bench.latency_ms.get(str(batch)) if bench else None
            if r is None:
                continue
            y = row + 0.4 - height * (i + 0.5)  # batch 1 on top
            ax.barh(y, r["p50"] - base, left=base, height=height * 0.9,
                    color=_BATCH_COLORS[i % len(_BATCH_COLORS)],
                    hatch="///" if failed else None, edgecolor=_FAILED_COLOR if failed else "none",
                    alpha=0.45 if failed else 1.0)
            ax.text(r["p50"] * 1.05 if log else r["p50"] + top * 0.01, y, f"{r['p50']:.3g} ms",
                    va="center", fontsize=8)
        if bench is None:
            ax.text(base * 1.1 if log else top * 0.01, row, f"{status_word(v)}: not timed", va="center",
                    fontsize=9, color=_FAILED_COLOR if failed else "#555555")
    ax.set_ylim(-0.6, len(variants) - 0.4)
    ax.set_yticks(range(len(variants)))
    ax.set_yticklabels([_chart_label(v, best) for v in variants], fontsize=9)
    for label, v in zip(ax.get_yticklabels(), variants):
        if v.status != READY:
            label.set_color(_FAILED_COLOR)
        if best is not None and v.id == best.id:
            label.set_fontweight("bold")
    if log:
        ax.set_xscale("log")
    ax.set_xlim(base, top * (3 if log else 1.2))
    ax.set_xlabel("p50 latency, milliseconds" + (" (log scale)" if log else "") + "; lower is better")
    where = "build host" if host_class == facts.build_host_class else "published host"
    ax.set_title(f"p50 latency per variant and batch size on {host_class} ({where})", fontsize=10)
    handles = [Patch(color=_BATCH_COLORS[i % len(_BATCH_COLORS)], label=f"batch {b}")
               for i, b in enumerate(batches)]
    if any(v.status == FAILED_PARITY for v in variants):
        handles.append(Patch(facecolor="white", edgecolor=_FAILED_COLOR, hatch="///",
                             label="failed parity (never selected)"))
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _chart_label(v: Variant, best: Variant | None) -> str:
    if v.status != READY:
        return f"{v.id}  [{status_word(v).upper()}]"
    return f"{v.id}  [fastest]" if best is not None and v.id == best.id else v.id


# -- the HTML page ---------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:16px;color:#1f2328;font-size:14px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 8px}
.muted{color:#656d76;font-size:12px}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
ul.glance{padding-left:18px;margin:6px 0}ul.glance li{margin:3px 0}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{border:1px solid #d0d7de;padding:3px 4px;text-align:left;vertical-align:top}
td.id{font-weight:600;white-space:nowrap}.wide{overflow-x:auto}
td.parity{min-width:140px}td.by{min-width:120px}
th{background:#f6f8fa}td.num{text-align:right;white-space:nowrap}
tr.failed_parity td{background:#ffebe9}tr.build_failed td{background:#f6f8fa;color:#656d76}
.badge{display:inline-block;padding:1px 6px;border-radius:10px;font-size:12px;font-weight:600}
.passed{background:#dafbe1;color:#116329}.failed{background:#ffebe9;color:#a40e26}
.buildfail{background:#eaeef2;color:#57606a}.best{background:#ddf4ff;color:#0550ae}
img{max-width:100%;border:1px solid #d0d7de}
"""


def render_html(facts: ModelFacts, chart_png: bytes | None = None) -> str:
    """The report page as one self-contained HTML string."""
    title = f"chimera report: {facts.model_name or 'model'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="muted">logged model {_e(facts.model_id or "-")} &middot; written '
        f"{_e(_now())} by mlflow-chimera {_e(mlflow_chimera.__version__)}</div>",
        _glance_html(facts),
    ]
    if chart_png:
        data = base64.b64encode(chart_png).decode("ascii")
        parts += ["<h2>Latency</h2>",
                  f'<img alt="p50 latency per variant and batch size" src="data:image/png;base64,{data}">']
    parts += [_variant_table_html(facts, host) for host in (facts.host_classes() or [facts.build_host_class])]
    parts += [_provenance_html(facts), _footer_html(facts), "</body></html>"]
    return "\n".join(parts)


def _glance_html(facts: ModelFacts) -> str:
    counts = ", ".join(f"{n} {word}" for word, n in facts.status_counts().items())
    items = [f"<b>{plural(len(facts.variants), 'variant')}</b>: {_e(counts)}"]
    for host_class, best in fastest_by_host_class(facts).items():
        here = " (where it was built)" if host_class == facts.build_host_class else ""
        items.append(f"<b>Fastest on {_e(host_class)}</b>{here}: "
                     f'<span class="badge best">{_e(best.id)}</span> '
                     f"p50 {_ms(p50(best, host_class))} at batch {RANK_BATCH}")
    if not fastest_by_host_class(facts):
        items.append("<b>No variant passed parity with a timing</b>: nothing can be ranked")
    items.append(f"<b>Built on</b> {_e(_host_line(facts))}")
    items.append(f"<b>Built with</b> {_e(built_with(facts))}")
    items.append(f'<b>Reference program</b> (torch.export) sha256 <span class="mono">'
                 f"{_e(facts.reference_sha256)}</span> ({_size(facts.reference_size)})")
    for backend, why in facts.skipped_backends.items():
        items.append(f"<b>Not built</b>: {_e(backend)}: {_e(why)}")
    items += [f'<b class="failed">Warning</b>: {_e(w)}' for w in facts.warnings]
    return '<h2>At a glance</h2><ul class="glance">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _variant_table_html(facts: ModelFacts, host_class: str) -> str:
    variants = _panel_variants(facts, host_class)
    batches = _batches(variants, host_class)
    best = fastest(facts.variants, host_class)
    head = ["variant", "backend", "precision", "target", "parity (largest error; tolerance)"]
    head += [f"p50 / p99 batch {b}" for b in batches] + ["size", "build", "built by"]
    rows = []
    for v in variants:
        bench = v.benchmark_for(host_class)
        marker = ' <span class="badge best">fastest</span>' if best and v.id == best.id else ""
        cells = [f'<td class="id">{_e(v.id)}{marker}</td>', f"<td>{_e(v.backend)}</td>",
                 f"<td>{_e(v.precision)}</td>", f"<td>{_e(v.target)}</td>",
                 f'<td class="parity">{_parity_html(v)}</td>']
        for b in batches:
            r = bench.latency_ms.get(str(b)) if bench else None
            cells.append(f'<td class="num">{_ms(r["p50"])}<br>{_ms(r["p99"])}</td>' if r
                         else '<td class="num">-</td>')
        size, is_reference = variant_size(facts, v)
        build_s = v.provenance.get("build_seconds")
        cells += [f'<td class="num">{_size(size)}{"<br>(reference)" if is_reference else ""}</td>',
                  f'<td class="num">{"-" if build_s is None else f"{build_s:.3g} s"}</td>',
                  f'<td class="by">{_e(compiler_line(v))}</td>']
        rows.append(f'<tr class="{_e(v.status)}">{"".join(cells)}</tr>')
    where = "the build host" if host_class == facts.build_host_class else "a published host"
    return (f"<h2>Variants, timed on {_e(host_class)} ({where})</h2>"
            f'<div class="wide"><table><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr>'
            f'{"".join(rows)}</table></div>'
            f'<div class="muted">Latency measured at log time, in milliseconds; timings are only '
            f"comparable within one host class. Ranked by p50 at batch {RANK_BATCH}. Size: the files "
            f"the variant loads.</div>")


def _parity_html(v: Variant) -> str:
    css = {READY: "passed", FAILED_PARITY: "failed", BUILD_FAILED: "buildfail"}.get(v.status, "buildfail")
    text = f'<span class="badge {css}">{_e(status_word(v))}</span>'
    if v.parity is not None:
        tol = ", ".join(f"{k} {_fmt(val)}" for k, val in v.parity.tolerance.items())
        text += (f'<div class="muted" title="{_e(v.parity.criterion)}">abs {_num(v.parity.max_abs)}, '
                 f"rel {_num(v.parity.max_rel)}; {_e(tol)}</div>")
    if v.reason:
        reason = v.reason if len(v.reason) <= 200 else v.reason[:200] + "… (see Provenance)"
        text += f'<div class="muted">{_e(reason)}</div>'
    return text


def _provenance_html(facts: ModelFacts) -> str:
    rows = []
    for v in facts.variants:
        prov = v.provenance
        host = prov.get("build_host") or {}
        details = {
            "compiler": compiler_line(v),
            "exporter / opset": " / ".join(x for x in (prov.get("exporter"), _opset(prov.get("opset"))) if x),
            "quantization": _compact(prov.get("quantization")),
            "parity criterion": v.parity.criterion if v.parity else "",
            "why it failed": (v.reason or "")[:1000],
            "options": _compact(v.options),
            "requires": _compact(v.requirements),
            "built at": prov.get("built_at", ""),
            "build host": host.get("host_class", ""),
            "files (sha256)": ", ".join(f"{p} {d[:12]}…" for p, d in v.files.items()) or
            prov.get("uses_reference", ""),
        }
        text = "<br>".join(f"<b>{_e(k)}</b>: {_e(str(val))}" for k, val in details.items() if val)
        rows.append(f"<tr><td><b>{_e(v.id)}</b></td><td>{text}</td></tr>")
    return ("<h2>Provenance</h2><table><tr><th>variant</th><th>how it was made</th></tr>"
            + "".join(rows) + "</table>")


def _footer_html(facts: ModelFacts) -> str:
    return ('<p class="muted">Written from MLmodel (flavor "chimera") and variants/&lt;id&gt;/variant.json '
            "of this model. Selection at load time considers only parity-passed variants that can run "
            "on the loading host, fastest measured p50 first; a failed variant is used only when forced "
            'by model_config={"variant": id}.</p>')


# -- small formatting helpers (shared with tracking) ------------------------------------------


def compiler_line(v: Variant) -> str:
    """``torch.onnx.export (dynamo) 2.13.0+cpu + onnxruntime 1.32.0`` — what built a variant."""
    prov = v.provenance
    text = " ".join(str(x) for x in (prov.get("compiler"), prov.get("compiler_version")) if x)
    if prov.get("quantizer"):
        text += f" + {prov['quantizer']} {prov.get('quantizer_version', '')}".rstrip()
    if prov.get("onnxruntime_version"):
        text += f", onnxruntime {prov['onnxruntime_version']}"
    return text or v.backend


def built_with(facts: ModelFacts) -> str:
    """The build tools' versions across variants, e.g. ``torch 2.13.0+cpu, onnxruntime 1.32.0``."""
    packages = {}
    for v in facts.variants:
        for name, version in ((v.provenance.get("build_host") or {}).get("packages") or {}).items():
            if name in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt"):
                packages.setdefault(name, set()).add(version)
    tools = [f"{n} {'/'.join(sorted(vs))}" for n, vs in sorted(packages.items())]
    return ", ".join(tools + [f"mlflow-chimera {facts.chimera_version}"])


def _host_line(facts: ModelFacts) -> str:
    for v in facts.variants:
        host = v.provenance.get("build_host") or {}
        if host.get("host_class") == facts.build_host_class:
            gpus = ", ".join(g.get("name", "") for g in host.get("gpus") or [])
            return (f"{facts.build_host_class}: {host.get('cpu_model', '?')}, "
                    f"{host.get('cpu_count', '?')} CPUs, "
                    f"{host.get('os', '?')} {host.get('arch', '')}, ISA up to {host.get('isa_level', '?')}"
                    + (f", GPU {gpus}" if gpus else ""))
    return facts.build_host_class


def _opset(opset) -> str:
    if isinstance(opset, dict):
        return ", ".join(f"{k} {v}" for k, v in opset.items())
    return "" if opset is None else str(opset)


def _compact(value) -> str:
    if not value:
        return ""
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.2e}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def _size(size) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
