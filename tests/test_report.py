"""The report (HTML + PNG), the metric names and the tags, from variant records made in code;
and the report of a logged model, written at log time and refreshed when variants are added."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlflow_chimera import report, tracking
from mlflow_chimera.manifest import BUILD_FAILED, FAILED_PARITY, READY, Benchmark, Parity, Variant

HOST = "linux-x86_64-intel-xeon-2cpu"
GPU_HOST = "linux-x86_64-amd-epyc-16cpu-nvidia-h100"
SHA = "ab" * 32


def _bench(host: str, p50_b1: float) -> Benchmark:
    return Benchmark(host_class=host, latency_ms={
        "1": {"p50": p50_b1, "p90": p50_b1 * 1.2, "p99": p50_b1 * 1.5},
        "8": {"p50": p50_b1 * 4, "p90": p50_b1 * 5, "p99": p50_b1 * 6},
    })


def _parity(passed: bool, max_abs: float, reason=None) -> Parity:
    return Parity(passed=passed, tolerance={"atol": 1e-4, "rtol": 1e-3}, criterion="elementwise",
                  checks=[{"batch": 1,
                           "outputs": [{"name": "y", "max_abs": max_abs, "max_rel": max_abs * 10}]}],
                  reason=reason)


def _variant(vid, backend, precision, status=READY, p50=None, max_abs=1e-7, reason=None, **extra):
    build_host = {"host_class": HOST, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_count": 2,
                  "os": "linux", "arch": "x86_64", "isa_level": "avx512f",
                  "packages": {"torch": "2.13.0+cpu", "onnxruntime": "1.32.0"}}
    provenance = {"compiler": "torch.onnx.export (dynamo)", "compiler_version": "2.13.0+cpu",
                  "build_seconds": 1.5, "built_at": "2026-01-01T00:00:00+00:00", "build_host": build_host,
                  **extra.pop("provenance", {})}
    return Variant(
        id=vid, backend=backend, precision=precision, target="cpu", status=status, reason=reason,
        files=extra.pop("files", {"model.onnx": "cd" * 32}), provenance=provenance,
        parity=None if status == BUILD_FAILED else _parity(status == READY, max_abs, reason),
        benchmarks=[_bench(HOST, p50)] if p50 is not None else [], **extra,
    )


@pytest.fixture
def facts():
    variants = [
        _variant("onnxruntime-fp32-cpu", "onnxruntime", "fp32", p50=0.05),
        _variant("onnxruntime-int8-cpu", "onnxruntime", "int8", FAILED_PARITY, p50=0.03, max_abs=0.5,
                 reason="output 'y' at batch 1: max abs error 0.5 exceeds atol 0.1"),
        _variant("eager-fp32-cpu", "eager", "fp32", p50=0.4, max_abs=0.0, files={},
                 provenance={"compiler": "torch.export (eager interpreter)",
                             "uses_reference": "reference/program.pt2"}),
        _variant("tensorrt-fp16-sm90", "tensorrt", "fp16", BUILD_FAILED,
                 reason="RuntimeError: " + "no CUDA device " * 1000),
    ]
    variants[0].benchmarks.append(_bench(GPU_HOST, 0.02))  # published from another host class
    return report.ModelFacts(
        reference_sha256=SHA, build_host_class=HOST, chimera_version="0.1.0", variants=variants,
        sizes={"onnxruntime-fp32-cpu": 2_500_000, "onnxruntime-int8-cpu": 700_000,
               "eager-fp32-cpu": 0, "tensorrt-fp16-sm90": 0},
        reference_size=2_600_000, skipped_backends={"aotinductor": "no C++ compiler"},
        model_id="m-123", model_name="clf",
    )


def test_metric_names_group_by_measure_and_sort_latency_first(facts):
    metrics = tracking.variant_metrics(facts)
    assert metrics["chimera.latency_p50_ms.batch_1/onnxruntime-fp32-cpu"] == 0.05
    assert metrics["chimera.latency_p99_ms.batch_8/onnxruntime-fp32-cpu"] == pytest.approx(0.3)
    assert metrics["chimera.parity_max_abs_err/onnxruntime-int8-cpu"] == 0.5
    assert metrics["chimera.parity_max_rel_err/onnxruntime-int8-cpu"] == 5.0
    assert metrics["chimera.seconds_to_build/tensorrt-fp16-sm90"] == 1.5
    assert metrics["chimera.size_mb/onnxruntime-fp32-cpu"] == 2.5
    assert metrics["chimera.size_mb/eager-fp32-cpu"] == 2.6  # it loads the reference program
    assert "chimera.latency_p50_ms.batch_1/tensorrt-fp16-sm90" not in metrics  # never timed
    # Only timings from the build host (the run's host) become run metrics.
    assert not any(v == 0.02 for v in metrics.values())
    sections = [name.split("/")[0].split(".")[1] for name in metrics]
    assert sections == sorted(sections) and sections[0] == "latency_p50_ms"
    assert all(re.fullmatch(r"[\w\-./ ]+", name) and len(name) <= 250 for name in metrics)


def test_tags_say_status_fastest_and_what_built_them(facts):
    tags = tracking.variant_tags(facts)
    assert tags["chimera.variants"] == (
        "4 variants · passed: onnxruntime-fp32-cpu, eager-fp32-cpu · "
        "failed parity: onnxruntime-int8-cpu · build failed: tensorrt-fp16-sm90")
    # int8 is faster but failed parity: it is never ranked first.
    assert tags[f"chimera.fastest.{HOST}"] == "onnxruntime-fp32-cpu"
    assert tags[f"chimera.fastest.{GPU_HOST}"] == "onnxruntime-fp32-cpu"
    assert tags["chimera.status.onnxruntime-fp32-cpu"] == \
        "passed · p50 0.05 ms at batch 1 · max abs err 1e-07"
    assert tags["chimera.status.onnxruntime-int8-cpu"].startswith("failed parity · p50 0.03 ms")
    assert "exceeds atol" in tags["chimera.status.onnxruntime-int8-cpu"]
    assert tags["chimera.status.tensorrt-fp16-sm90"].startswith("build failed: RuntimeError: no CUDA")
    assert tags["chimera.built_with"] == "onnxruntime 1.32.0, torch 2.13.0+cpu, mlflow-chimera 0.1.0"
    assert tags["chimera.build_host_class"] == HOST and tags["chimera.reference_sha256"] == SHA
    assert "report/chimera-report.html" in tags["chimera.report"]
    assert all(len(v) <= tracking.MAX_TAG_VALUE for v in tags.values())
    assert all(re.fullmatch(r"[\w\-./ ]+", k) and len(k) <= 250 for k in tags)


def test_description_answers_the_questions_and_is_ours_to_rewrite(facts):
    text = tracking.description(facts)
    assert text.startswith(
        "**mlflow-chimera** model `clf`: 4 variants (2 passed, 1 failed parity, 1 build failed)")
    assert f"**fastest on `{HOST}`** (build host): **onnxruntime-fp32-cpu**" in text
    assert "built on `linux-x86_64-intel-xeon-2cpu` with onnxruntime 1.32.0, torch 2.13.0+cpu" in text
    assert "`onnxruntime-int8-cpu`: failed parity" in text
    assert tracking._ours_to_write(None) and tracking._ours_to_write(text)
    assert not tracking._ours_to_write("my own notes")


def test_report_is_self_contained_and_shows_every_variant(facts, tmp_path):
    chart, page = report.write_report(facts, tmp_path)
    assert chart.name == "chimera-latency.png" and page.name == "chimera-report.html"
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and chart.stat().st_size > 5000
    text = page.read_text(encoding="utf-8")
    for vid in ("onnxruntime-fp32-cpu", "onnxruntime-int8-cpu", "eager-fp32-cpu", "tensorrt-fp16-sm90"):
        assert vid in text
    for words in ("4 variants", "2 passed, 1 failed parity, 1 build failed", f"Fastest on {HOST}",
                  f"Fastest on {GPU_HOST}", "Built with", "Intel(R) Xeon(R) Processor, 2 CPUs",
                  "aotinductor: no C++ compiler", SHA, "2.5 MB", "2.6 MB<br>(reference)",
                  "exceeds atol 0.1", "torch.onnx.export (dynamo) 2.13.0+cpu"):
        assert words in text, words
    assert text.count("data:image/png;base64,") == 1  # the chart travels inside the page
    _assert_no_external_references(text)


def _assert_no_external_references(text: str) -> None:
    lowered = text.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert "url(" not in lowered and "@font-face" not in lowered
    without_images = re.sub(r"data:image/png;base64,[a-z0-9+/=]+", "", lowered)
    assert not re.search(r"(https?:)?//[a-z0-9]", without_images)
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.I):
        assert attr.startswith("data:"), attr


def test_report_of_a_model_with_no_timings_still_renders(tmp_path):
    broken = report.ModelFacts(reference_sha256=SHA, build_host_class=HOST, chimera_version="0.1.0",
                               variants=[_variant("tensorrt-fp16-sm90", "tensorrt", "fp16", BUILD_FAILED,
                                                  reason="RuntimeError: no GPU")])
    chart, page = report.write_report(broken, tmp_path)
    assert chart.stat().st_size > 0
    assert "No variant passed parity" in page.read_text(encoding="utf-8")
    assert tracking.variant_tags(broken)["chimera.variants"] == \
        "1 variant · build failed: tensorrt-fp16-sm90"


# -- on a logged model -------------------------------------------------------------------------


def _report_text(client, model_id: str, tmp_path: Path) -> str:
    import mlflow

    logged = client.get_logged_model(model_id)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{logged.artifact_location}/report/chimera-report.html", dst_path=str(tmp_path))
    return Path(local).read_text(encoding="utf-8")


def test_report_is_written_at_log_time_and_refreshed_when_variants_are_added(logged, tmp_path):
    from mlflow.tracking import MlflowClient

    info, _, _, _ = logged.get("mlp")
    client = MlflowClient()
    listed = {f.path for f in client.list_logged_model_artifacts(info.model_id, "report")}
    assert listed == {"report/chimera-report.html", "report/chimera-latency.png"}
    first = _report_text(client, info.model_id, tmp_path / "1")
    assert "onnxruntime-fp32-cpu" in first and "published-fp16-gpu" not in first
    _assert_no_external_references(first)

    # A variant built later on another host (what `chimera compile` will publish) is added.
    added = _variant("published-fp16-gpu", "onnxruntime", "fp16", p50=0.01)
    added.benchmarks = [_bench(GPU_HOST, 0.01)]
    facts = report.refresh_report(info.model_id, extra_variants=[added], client=client)
    assert facts.variants[-1].id == "published-fp16-gpu"
    second = _report_text(client, info.model_id, tmp_path / "2")
    assert "published-fp16-gpu" in second and f"Fastest on {GPU_HOST}" in second
    # Refreshing again from the model alone rewrites the same two files.
    facts = report.refresh_report(info.model_id, client=client)
    assert "published-fp16-gpu" not in _report_text(client, info.model_id, tmp_path / "3")
    assert {f.path for f in client.list_logged_model_artifacts(info.model_id, "report")} == listed

    # The same facts can be read from a downloaded (or saved) model directory.
    import mlflow

    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model"))
    on_disk = report.facts_from_dir(local)
    assert [v.id for v in on_disk.variants] == [v.id for v in facts.variants]
    assert on_disk.sizes == facts.sizes and on_disk.reference_size == facts.reference_size > 0
    assert not on_disk.warnings and not facts.warnings


def test_someone_elses_description_is_kept(logged):
    from mlflow.tracking import MlflowClient

    info, _, _, name = logged.get("mlp")
    client = MlflowClient()
    client.set_tag(info.run_id, "mlflow.note.content", "my notes on this run")
    facts = report.facts_from_logged_model(info.model_id, client=client)
    tracking.record_facts(client, facts, run_id=info.run_id, model_id=info.model_id,
                          model_version=(name, "1"))
    assert client.get_run(info.run_id).data.tags["mlflow.note.content"] == "my notes on this run"
    assert client.get_logged_model(info.model_id).tags["mlflow.note.content"].startswith("**mlflow-chimera**")
    assert client.get_model_version(name, "1").description.startswith("**mlflow-chimera**")


def test_drawing_the_chart_leaves_the_callers_matplotlib_backend_alone(facts, tmp_path):
    """In a notebook the process-wide backend is the user's: the chart is drawn on its own Agg
    canvas without switching it."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        report.render_chart(facts, tmp_path / "chart.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
    finally:
        matplotlib.use(before)
