"""The ``chimera`` command: inspect, explain, benchmark and compile chimera models.

    chimera variants models:/clf/3          every variant: parity, latency, size, status
    chimera explain models:/clf@prod        which variant this host loads, and why not the others
    chimera doctor                          what this host can build and run
    chimera bench models:/clf/3             time the variants here; store the figures
    chimera compile models:/clf/3 ...       build variants on this host and publish them
    chimera prefetch models:/clf@prod       fill the local cache with what this host loads

``MODEL_URI`` is anything MLflow resolves (``models:/name/version``, ``models:/name@alias``,
``models:/m-<id>``, ``runs:/<run id>/<path>``) or a local model directory. The tracking server
comes from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``. Every command prints a table for people
and, with ``--json``, the same facts as JSON for scripts. On failure the exit status is 1 and
stderr has one line, ``error: <cause>`` (``--debug`` shows the traceback instead).

Importing this module imports click and nothing heavy: MLflow, numpy and the backends are
imported inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import click

from mlflow_chimera import FLAVOR_NAME, __version__
from mlflow_chimera.manifest import RANK_BATCH, READY, read_mlmodel
from mlflow_chimera.summary import STATUS_WORDS, parity_word

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "openvino", "tensorrt",
              "mlflow", "numpy")
_TENSORRT_DISTS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-libs")
# Failures that are the user's situation (bad URI, missing model, unbuildable backend, …): one
# line on stderr and exit status 1. Anything else is a bug and keeps its traceback.
_EXPECTED = (ValueError, RuntimeError, OSError, LookupError)
_EXPECTED_NAMES = {"MlflowException", "IntegrityError", "YAMLError"}


# -- the group and error handling --------------------------------------------------------------


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - narrowed by _expected below
            if ctx.params.get("debug") or not _expected(exc):
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(1)


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, _EXPECTED) or any(c.__name__ in _EXPECTED_NAMES for c in type(exc).__mro__)


def _one_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) if type(exc).__name__ == "MlflowException" else None
    lines = [line.strip() for line in str(message or exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tracking-uri", metavar="URI", default=None,
              help="MLflow tracking server or store (default: $MLFLOW_TRACKING_URI).")
@click.option("--debug", is_flag=True, help="Show tracebacks and the library's info logs.")
@click.version_option(__version__, prog_name="chimera")
def main(tracking_uri, debug):
    """Inspect, explain, benchmark and compile mlflow-chimera models."""
    if tracking_uri:
        # The environment, so that everything this process creates (clients, downloads) uses it.
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    # One bar per downloaded file is noise on a terminal and in logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Warnings (a variant skipped at load, …) stay visible; info lines only with --debug.
    logging.getLogger("mlflow.chimera").setLevel(logging.DEBUG if debug else logging.WARNING)


cli = main  # click.testing.CliRunner().invoke(cli, [...])


def _json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def _emit_json(data) -> None:
    click.echo(json.dumps(_clean(data), indent=2, sort_keys=False))


def _clean(value):
    """JSON-safe: NaN/Inf become null, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _table(header: list, rows: list) -> str:
    """Aligned columns, a rule under the header; numbers are not right-aligned on purpose
    (mixed units and labels read better left-aligned)."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _bytes(n) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# -- resolving a model -------------------------------------------------------------------------


@contextlib.contextmanager
def _local_model(model_uri: str):
    """A local directory holding the model at ``model_uri`` (downloaded when not local)."""
    if os.path.isdir(model_uri):
        yield Path(model_uri)
        return
    if not _URI_SCHEME.match(model_uri):
        raise FileNotFoundError(f"{model_uri!r} is neither a model directory nor a model URI "
                                "(models:/name/version, models:/name@alias, models:/m-<id>, runs:/…)")
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="chimera-cli-") as tmp:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))


def _read_mlmodel(model_dir: Path, model_uri: str) -> tuple[dict, dict]:
    """(the MLmodel document, its chimera flavor configuration)."""
    path = model_dir / "MLmodel"
    if not path.is_file():
        raise ValueError(f"{model_uri} is not an MLflow model (no MLmodel file in it)")
    doc = read_mlmodel(path)
    conf = (doc.get("flavors") or {}).get(FLAVOR_NAME)
    if conf is None:
        raise ValueError(f"{model_uri} is not a chimera model; its flavors are "
                         f"{sorted(doc.get('flavors') or {})}")
    return doc, conf


# -- chimera variants --------------------------------------------------------------------------

def _p50(v, host_class: str, build_class: str | None) -> tuple[float | None, str | None]:
    """p50 at batch 1: measured on ``host_class`` if it was, else on the build host's class,
    else on any class; with the class it was measured on."""
    order = [host_class, build_class] + [b.host_class for b in v.benchmarks]
    for cls in order:
        bench = v.benchmark_for(cls) if cls else None
        if bench is not None and bench.p50(RANK_BATCH) is not None:
            return bench.p50(RANK_BATCH), cls
    return None, None


def _variant_size(v, model_dir: Path, reference_conf: dict) -> tuple[int | None, str | None]:
    """(bytes of the files the variant loads, a note). From the local files when they are in
    the model directory, else from a listing of the artifact location they were published to
    (nothing is downloaded); None when neither answers."""
    from mlflow_chimera.manifest import BUILD_FAILED, REFERENCE_PROGRAM, variant_dir

    if v.status == BUILD_FAILED:
        return None, "build failed"
    if not v.files and v.provenance.get("uses_reference"):
        ref = model_dir / (v.provenance.get("uses_reference") or REFERENCE_PROGRAM)
        if ref.is_file():
            return ref.stat().st_size, "reference program"
        uri = reference_conf.get("uri")
        size = _remote_sizes(uri.rsplit("/", 1)[0]).get(uri.rsplit("/", 1)[1]) if uri else None
        return size, "reference program"
    vdir = variant_dir(model_dir, v.id)
    paths = [vdir / rel for rel in v.files]
    if all(p.is_file() for p in paths):
        return sum(p.stat().st_size for p in paths), None
    recorded = getattr(v, "size_bytes", None)  # should records ever carry it
    if isinstance(recorded, int):
        return recorded, None
    listed = _remote_sizes(v.location) if getattr(v, "location", None) else {}
    if listed and all(rel in listed for rel in v.files):
        return sum(listed[rel] for rel in v.files), None
    return None, "unknown"


def _remote_sizes(uri: str, prefix: str = "") -> dict:
    """{relative path: bytes} of the files under an artifact URI, from a listing; {} when the
    store cannot list it."""
    import mlflow

    sizes = {}
    try:
        infos = mlflow.artifacts.list_artifacts(artifact_uri=uri)
    except Exception:  # noqa: BLE001 - sizes are informative only
        return sizes
    for info in infos:
        name = info.path.rstrip("/").rsplit("/", 1)[-1]  # listings name paths differently per URI
        if info.is_dir:
            sizes.update(_remote_sizes(f"{uri.rstrip('/')}/{name}", f"{prefix}{name}/"))
        elif info.file_size is not None:
            sizes[f"{prefix}{name}"] = info.file_size
    return sizes


def _variant_rows(model_dir: Path, conf: dict) -> tuple[list, str]:
    from mlflow_chimera import backends as backend_registry
    from mlflow_chimera import host as host_mod
    from mlflow_chimera import runtime
    from mlflow_chimera.selection import rank

    variants, _ = runtime.read_variants(model_dir, conf)  # with those published by `chimera compile`
    published_ids = {v.id for v in variants} - set(conf["variants"])
    host = host_mod.fingerprint()
    decision = rank(variants, host)
    order = {c.variant.id: i for i, c in enumerate(decision.candidates, 1)}
    rows = []
    for v in variants:
        build_host = v.provenance.get("build_host") or {}
        build_class = build_host.get("host_class") or conf.get("build_host_class")
        p50, p50_class = _p50(v, host.host_class, build_class)
        size, size_note = _variant_size(v, model_dir, conf.get("reference") or {})
        try:
            not_here = backend_registry.get(v.backend).incompatibility(v, host)
        except ValueError as exc:
            not_here = str(exc)
        rows.append({
            "id": v.id,
            "backend": v.backend,
            "precision": v.precision,
            "target": v.target,
            "built_on": build_class,
            "parity": parity_word(v),
            "max_abs_err": None if v.parity is None else v.parity.max_abs,
            "max_rel_err": None if v.parity is None else v.parity.max_rel,
            "tolerance": None if v.parity is None else v.parity.tolerance,
            "p50_ms": p50,
            "p50_batch": RANK_BATCH,
            "p50_host_class": p50_class,
            "p50_measured_here": p50_class is not None and p50_class == host.host_class,
            "p50_ms_by_host_class": {b.host_class: {k: r.get("p50") for k, r in b.latency_ms.items()}
                                     for b in v.benchmarks},
            "size_bytes": size,
            "size_note": size_note,
            "status": v.status,
            "reason": v.reason,
            "published": v.id in published_ids,
            "runs_here": not_here is None,
            "not_here_reason": not_here,
            "rank_here": order.get(v.id),
            "rejected_here": decision.rejected.get(v.id),
        })
    return rows, host.host_class


@main.command()
@click.argument("model_uri")
@_json_option
def variants(model_uri, as_json):
    """Every variant of MODEL_URI: parity, p50 latency at batch 1, size, status.

    p50 is the one measured on this host's class when there is one; otherwise the build host's,
    labelled with the class it was measured on. "here" is the variant's place in this host's
    ranking (1 = what loading the model here tries first)."""
    with _local_model(model_uri) as model_dir:
        doc, conf = _read_mlmodel(model_dir, model_uri)
        rows, host_class = _variant_rows(model_dir, conf)
    if as_json:
        _emit_json({"model_uri": model_uri, "model_id": doc.get("model_id"), "host_class": host_class,
                    "variants": rows})
        return
    body = []
    for r in rows:
        err = r["max_abs_err"]
        p50 = _ms(r["p50_ms"])
        if r["p50_ms"] is not None and not r["p50_measured_here"]:
            p50 += " (build host)" if r["p50_host_class"] == r["built_on"] else f" ({r['p50_host_class']})"
        size = _bytes(r["size_bytes"]) if r["size_note"] != "build failed" else "-"
        if r["size_note"] == "reference program":
            size += " (reference)"
        status = ("ready" if r["status"] == READY else STATUS_WORDS.get(r["status"], r["status"])) + \
            (" (published)" if r["published"] else "")
        here = f"#{r['rank_here']}" if r["rank_here"] else "no"
        body.append([r["id"], r["backend"], r["precision"], r["built_on"] or "?", r["parity"],
                     "-" if err is None or err != err else f"{err:.2g}", p50, size, status, here])
    click.echo(f"model: {model_uri}" + (f" ({doc['model_id']})" if doc.get("model_id") else ""))
    click.echo(f"this host class: {host_class}")
    click.echo("")
    click.echo(_table(["variant", "backend", "precision", "built on", "parity", "max abs err",
                       f"p50 ms @ batch {RANK_BATCH}", "size", "status", "here"], body))
    notes = [f"  {r['id']}: {r['rejected_here']}" for r in rows if r["rejected_here"]]
    if notes:
        click.echo("\nnot candidates here:\n" + "\n".join(notes))


# -- chimera explain ---------------------------------------------------------------------------


@main.command()
@click.argument("model_uri")
@click.option("--variant", default=None, help="Force this variant id (as model_config={'variant': …}).")
@click.option("--backend", default=None, help="Only variants of this backend.")
@click.option("--precision", default=None, help="Only variants of this precision.")
@_json_option
def explain(model_uri, variant, backend, precision, as_json):
    """Which variant this host loads for MODEL_URI, and why each other one was not chosen.

    Loads the model as mlflow.pyfunc.load_model would (integrity checks and the output check
    included), with the same model_config the options give."""
    from mlflow_chimera import runtime

    config = {k: v for k, v in (("variant", variant), ("backend", backend), ("precision", precision)) if v}
    with _local_model(model_uri) as model_dir:
        _, conf = _read_mlmodel(model_dir, model_uri)
        try:
            model = runtime.load(model_dir, conf, config or None)
        except RuntimeError as exc:
            # No variant could be loaded: the message carries the full explanation.
            first, _, rest = str(exc).partition("\n")
            if as_json:
                _emit_json({"chosen": None, "error": first, "explanation": rest})
            elif rest:
                click.echo(rest)
            raise RuntimeError(first) from exc
        decision = model.decision
    if as_json:
        _emit_json({
            "model_uri": model_uri,
            "host_class": decision.host_class,
            "model_config": config,
            "chosen": decision.chosen.id if decision.chosen else None,
            "forced": decision.forced,
            "ranking": [{"id": c.variant.id, "basis": c.basis, "p50_ms": c.p50_ms}
                        for c in decision.candidates],
            "rejected": dict(decision.rejected),
            "skipped": [{"id": vid, "error": error} for vid, error in decision.attempts],
        })
        return
    click.echo(decision.explain())


# -- chimera doctor ----------------------------------------------------------------------------


def _cxx() -> dict | None:
    import shutil
    import subprocess

    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
                version = out.strip().splitlines()[0] if out.strip() else None
            except (OSError, subprocess.SubprocessError):
                version = None
            return {"name": name, "path": path, "version": version}
    return None


def _libraries() -> dict:
    from mlflow_chimera.host import installed_version

    found = {p: installed_version(p) for p in _LIBRARIES}
    if found.get("tensorrt") is None:
        found["tensorrt"] = next((v for d in _TENSORRT_DISTS if (v := installed_version(d))), None)
    return found


def _ort_providers(installed: bool) -> list | None:
    """ONNX Runtime's available execution providers (imports onnxruntime, never torch)."""
    if not installed:
        return None
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001 - an unusable install reads as "none"
        return None


def _backend_report(host) -> dict:
    from mlflow_chimera import backends as backend_registry
    from mlflow_chimera.manifest import Variant

    report = {}
    for name in backend_registry.names():
        try:
            backend = backend_registry.get(name)
        except ValueError as exc:
            report[name] = {"can_build": False, "build_reason": str(exc), "can_run": False,
                            "run_reason": str(exc)}
            continue
        build_reason = backend.build_unavailable_reason()
        # A variant with no recorded requirements: what any variant of the backend needs here.
        probe = Variant(id=f"{name}-probe", backend=name, precision="fp32", target="cpu")
        run_reason = backend.incompatibility(probe, host)
        report[name] = {"can_build": build_reason is None, "build_reason": build_reason,
                        "can_run": run_reason is None, "run_reason": run_reason,
                        "needs_torch_at_runtime": getattr(backend, "needs_torch_at_runtime", None)}
    return report


@main.command()
@_json_option
def doctor(as_json):
    """What this host is, and which backends it can build and run."""
    import platform

    from mlflow_chimera import host as host_mod

    host = host_mod.fingerprint()
    libraries = _libraries()
    info = {
        "os": host.os,
        "os_release": platform.release(),
        "arch": host.arch,
        "cpu_model": host.cpu_model,
        "cpu_count": host.cpu_count,
        "isa": list(host.isa),
        "isa_level": host.isa_level,
        "host_class": host.host_class,
        "gpus": [{"name": g.name, "compute_capability": g.compute_capability, "memory_mib": g.memory_mib}
                 for g in host.gpus],
        "driver": host.driver,
        "python": platform.python_version(),
        "libraries": libraries,
        "onnxruntime_providers": _ort_providers(bool(libraries.get("onnxruntime") or
                                                     libraries.get("onnxruntime-gpu"))),
        "cxx": _cxx(),
        "backends": _backend_report(host),
    }
    if as_json:
        _emit_json(info)
        return
    gpus = ", ".join(f"{g['name']} (sm {g['compute_capability']}, {g['memory_mib']} MiB)"
                     for g in info["gpus"])
    pairs = [
        ("host class", info["host_class"]),
        ("os", f"{info['os']} {info['os_release']}"),
        ("arch", info["arch"]),
        ("cpu", f"{info['cpu_model']} ({info['cpu_count']} cores)"),
        ("isa", f"{' '.join(info['isa']) or '-'} (highest: {info['isa_level']})"),
        ("gpus", (gpus + (f"; driver {info['driver']}" if info["driver"] else "")) if gpus
         else "none (nvidia-smi " + ("found no GPU)" if _which("nvidia-smi") else "not found)")),
        ("python", info["python"]),
        ("c++ compiler", f"{info['cxx']['path']} ({info['cxx']['version']})" if info["cxx"] else "none"),
    ]
    pairs += [(name, version or "not installed") for name, version in libraries.items()]
    if info["onnxruntime_providers"] is not None:
        pairs.append(("onnxruntime providers", ", ".join(info["onnxruntime_providers"])))
    width = max(len(k) for k, _ in pairs)
    click.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs))
    click.echo("")
    rows = [[name, "yes" if b["can_build"] else "no", "yes" if b["can_run"] else "no",
             "; ".join(r for r in (b["build_reason"] and f"build: {b['build_reason']}",
                                   b["run_reason"] and f"run: {b['run_reason']}") if r)]
            for name, b in info["backends"].items()]
    click.echo(_table(["backend", "build", "run", "why not"], rows))


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


# -- chimera bench -----------------------------------------------------------------------------


def _model_id(model_uri: str) -> str | None:
    """The logged model id behind a tracking-store URI (reads only MLmodel)."""
    import tempfile

    import mlflow
    with tempfile.TemporaryDirectory(prefix="chimera-cli-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri.rstrip("/") + "/MLmodel",
                                                   dst_path=tmp)
        return read_mlmodel(path).get("model_id")


@main.command()
@click.argument("model_uri")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, metavar="N",
              help="Batch size to time (repeatable; default: 1 and the logged example's batch).")
@click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Timing cap per variant and batch size (default: $CHIMERA_BENCH_MAX_SECONDS or 1).")
@click.option("--no-store", is_flag=True, help="Only print; do not store the figures with the model.")
@_json_option
def bench(model_uri, batches, max_seconds, no_store, as_json):
    """Time every variant of MODEL_URI that can run on this host, and store the figures with the
    model for this host's class (selection ranks by them on hosts of this class)."""
    from mlflow_chimera.host_benchmark import BENCHMARKS_DIR, benchmark, benchmark_file

    if not os.path.isdir(model_uri) and not _URI_SCHEME.match(model_uri):
        raise FileNotFoundError(f"{model_uri!r} is neither a model directory nor a model URI")
    timing = {"max_seconds": max_seconds} if max_seconds is not None else None
    batches = sorted(set(batches))
    if batches and RANK_BATCH not in batches and not no_store:
        # A stored result replaces this host class's figures, and selection ranks by batch 1:
        # storing without it would leave the class unranked.
        batches.insert(0, RANK_BATCH)
        click.echo(f"chimera: also timing batch {RANK_BATCH}, which selection ranks by "
                   "(--no-store to time only the batches given)", err=True)
    result = benchmark(model_uri, batches=batches or None, timing=timing, store=not no_store)
    stored = None
    if not no_store:
        if os.path.isdir(model_uri):
            stored = str(benchmark_file(model_uri, result["host_class"]))
        else:
            model_id = _model_id(model_uri)
            stored = f"logged model {model_id}: artifacts/{BENCHMARKS_DIR}/{result['host_class']}.json"
    if as_json:
        _emit_json({"model_uri": model_uri, "stored": stored, **result})
        return
    rows = []
    for vid, entry in result["variants"].items():
        for b, r in sorted(entry["latency_ms"].items(), key=lambda kv: int(kv[0])):
            rows.append([vid, b, _ms(r["p50"]), _ms(r["p90"]), _ms(r["p99"]), r.get("calls", "")])
    rows.sort(key=lambda r: (int(r[1]), float(r[2]) if r[2] != "-" else math.inf))
    click.echo(f"host class: {result['host_class']}")
    click.echo("")
    click.echo(_table(["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "calls"], rows))
    if result["skipped"]:
        click.echo("\nnot timed:")
        click.echo("\n".join(f"  {vid}: {why}" for vid, why in result["skipped"].items()))
    click.echo("")
    click.echo(f"stored: {stored}" if stored else "not stored (--no-store)")


# -- chimera compile ---------------------------------------------------------------------------


def _progress(*args, **kwargs) -> None:
    """Progress callback for compile_model: one line on stderr per call, whatever it passes."""
    parts = []
    for a in args:
        if isinstance(a, dict):
            parts += [f"{k}={v}" for k, v in a.items()]
        elif a is not None:
            parts.append(str(a))
    parts += [f"{k}={v}" for k, v in kwargs.items()]
    click.echo("chimera: " + " ".join(parts), err=True)


def _p50_of(entry: dict):
    value = entry.get("p50_ms")
    if isinstance(value, dict):  # per batch size
        value = value.get(str(RANK_BATCH), value.get(RANK_BATCH, next(iter(value.values()), None)))
    return value if isinstance(value, (int, float)) else None


@main.command(name="compile")
@click.argument("model_uri")
@click.option("--backend", "backends", multiple=True, metavar="NAME",
              help="Backend to build (repeatable; default: every backend this host can build).")
@click.option("--precision", "precisions", multiple=True, metavar="P",
              help="Precision to build (repeatable, e.g. fp32, fp16, int8; default: the backend's).")
@click.option("--signing-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="EC private key (PEM) to sign the published variants with (default: $CHIMERA_SIGNING_KEY).")
@_json_option
def compile_(model_uri, backends, precisions, signing_key, as_json):
    """Build variants of MODEL_URI on this host, check parity, time them, and publish the ones
    that pass to the same model (progress on stderr)."""
    try:
        from mlflow_chimera.publish import compile_model
    except ModuleNotFoundError as exc:
        if exc.name not in ("mlflow_chimera.publish",):
            raise
        raise RuntimeError("compile is not available in this installation "
                           "(mlflow_chimera.publish is missing)") from exc
    result = compile_model(model_uri, backends=list(backends) or None,
                           precisions=list(precisions) or None, progress=_progress,
                           signing_key_path=signing_key)
    if as_json:
        _emit_json(result)
        return
    published = set(result.get("published") or [])
    skipped = result.get("skipped") or {}
    entries = result.get("variants") or {}
    rows = [[vid, entry.get("status", "-"), _ms(_p50_of(entry)),
             "yes" if vid in published else "no"] for vid, entry in entries.items()]
    rows += [[vid, "skipped", "-", "no"] for vid in skipped if vid not in entries]
    if result.get("model_id"):
        click.echo(f"model: {result['model_id']}" + (f" (host class {result['host_class']})"
                                                      if result.get("host_class") else ""))
        click.echo("")
    click.echo(_table(["variant", "status", f"p50 ms @ batch {RANK_BATCH}", "published"], rows))
    if skipped:
        click.echo("\nnot published:")
        click.echo("\n".join(f"  {vid}: {why}" for vid, why in skipped.items()))
    click.echo(f"\npublished {len(published)} variant(s)" + (f": {', '.join(sorted(published))}"
                                                            if published else ""))
    if result.get("run_id"):
        click.echo(f"files: artifacts of run {result['run_id']}")


# -- chimera prefetch --------------------------------------------------------------------------


@main.command()
@click.argument("model_uri")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="The cache to fill (default: $CHIMERA_CACHE_DIR, else ~/.cache/mlflow-chimera).")
@click.option("--all", "everything", is_flag=True,
              help="Every ready variant that can run on this host, not only the one it loads.")
@_json_option
def prefetch(model_uri, cache_dir, everything, as_json):
    """Fill the local cache with what this host loads for MODEL_URI, verified: e.g. while
    building an image whose root file system is read-only when it serves.

    Runs the loader's own selection and fetches the variant it chooses and, where that
    variant's backend needs it, the reference program. With --all, also every other ready
    variant that can run here (lossy precisions included). Serving hosts then read the cache
    (CHIMERA_CACHE_DIR, read-only is fine) without fetching."""
    from mlflow_chimera import cache

    if cache_dir:
        os.environ[cache.CACHE_ENV] = os.path.abspath(cache_dir)
    root = cache.cache_root()
    why = cache.unwritable_reason(root)
    if why:
        raise OSError(f"cannot prefetch into {root}: {why}")
    with _local_model(model_uri) as model_dir, cache.recorded() as seen:
        _, conf = _read_mlmodel(model_dir, model_uri)
        loaded, not_fetched = _prefetch(model_dir, conf, model_uri, everything)
    names = {}  # variants with the same files share one entry
    for v in loaded.variants:
        names[v.content_key()] = f"{names[v.content_key()]}, {v.id}" if v.content_key() in names else v.id
    entries = [{"what": names.get(path.name, path.name) if kind == "variants" else _ENTRY_WORDS.get(kind, kind),
                "path": str(path), "fetched": fetched, "bytes": _entry_bytes(path)}
               for kind, path, fetched in seen]
    outside = [e["path"] for e in entries if not Path(e["path"]).is_relative_to(root)]
    if outside:
        raise OSError(f"{root} stopped being writable while prefetching; {outside[0]} went elsewhere")
    if as_json:
        _emit_json({"model_uri": model_uri, "cache_dir": str(root), "loads": loaded.variant.id,
                    "entries": entries, "not_fetched": not_fetched})
        return
    click.echo(f"cache: {root}")
    click.echo(_table(["entry", "status", "size", "path"],
                      [[e["what"], "fetched" if e["fetched"] else "already there", _bytes(e["bytes"]),
                        os.path.relpath(e["path"], root)] for e in entries]))
    if not_fetched:
        click.echo("\nnot fetched:\n" + "\n".join(f"  {vid}: {why}" for vid, why in not_fetched.items()))
    click.echo(f"\nthis host loads: {loaded.variant.id}; serve with {cache.CACHE_ENV}={root} (read-only is fine)")


_ENTRY_WORDS = {"reference": "reference program", "variant-records": "published variant record"}


def _prefetch(model_dir: Path, conf: dict, model_uri: str, everything: bool) -> tuple:
    """(the model as this host loads it, {variant id: why not fetched}). Loading fetches what
    it needs into the cache; ``everything`` loads each other runnable ready variant too."""
    from mlflow_chimera import host as host_mod
    from mlflow_chimera import runtime
    from mlflow_chimera import trust as trust_mod
    from mlflow_chimera.selection import rank

    source = None if os.path.isdir(model_uri) else trust_mod.requested_source(model_uri)
    model = runtime.load(model_dir, conf, source=source)
    not_fetched = {}
    if everything:
        others = [c.variant.id for c in rank(model.variants, host_mod.fingerprint(), {"accuracy": "any"}).candidates
                  if c.variant.id != model.variant.id]
        for vid in others:
            try:
                runtime.load(model_dir, conf, {"variant": vid}, source=source)
            except runtime.LOAD_FAILURES as exc:
                attempts = getattr(getattr(exc, "decision", None), "attempts", None)
                not_fetched[vid] = attempts[-1][1] if attempts else _one_line(exc)
    return model, not_fetched


def _entry_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


if __name__ == "__main__":  # python -m mlflow_chimera.cli
    main(prog_name="chimera")
