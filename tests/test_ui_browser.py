"""What a person sees in the MLflow UI, checked in a real browser.

Starts ``mlflow server`` on 127.0.0.1, logs and registers a CNN with ``mlflow.chimera`` (in a
child process, as a user's script would; the int8 variant is held to a tolerance it cannot meet,
so one variant fails parity), then drives headless Chromium — Debian's ``chromium`` package,
through Playwright's Python API, no browser download — to the run page, the run's metric charts,
the logged model page, the report in the logged model's artifacts and the model version page.
Screenshots go to ``test-artifacts/ui/``.

Where Chromium or Playwright is missing or Chromium cannot start, the tests fail with the reason
when ``CI`` is set (``.ci/run`` installs both) and are skipped with it elsewhere.

Run alone: ``python -m pytest tests/test_ui_browser.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import servers

CHROMIUM = os.environ.get("CHIMERA_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
MODEL_NAME = "chimera-ui-cnn"
TIMEOUT_MS = 60_000  # the UI is a single-page app: wait for text, generously (2 shared cores)

pytestmark = pytest.mark.slow


# -- the browser -----------------------------------------------------------------------------


def _unavailable(reason: str):
    """Fail in CI (the browser is part of what CI installs), skip elsewhere — with the reason."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"Playwright is not installed ({exc}); install the test extra: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM}; install Debian's package: apt-get install chromium")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
    except Exception as exc:  # noqa: BLE001 - any launch failure is reported with its message
        playwright.stop()
        _unavailable(f"Chromium at {CHROMIUM} cannot start: {exc}")
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


# -- the tracking server and the logged model ------------------------------------------------


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the session's sqlite store is not this server
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1 with a sqlite store and its own artifacts."""
    root = tmp_path_factory.mktemp("ui-server")
    port = servers.free_port()
    env = _child_env()
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: nothing here uses it
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with servers.running(cmd, port, "/health", env, "mlflow server", timeout=180) as running:
        yield running.url


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):
    """Log and register the model against the server in a child process (the session's own
    tracking URI stays untouched); returns what it logged."""
    out = tmp_path_factory.mktemp("ui-logged") / "logged.json"
    result = subprocess.run([sys.executable, __file__, server, str(out)], env=_child_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())


def _log_model(tracking_uri: str, out: str) -> None:
    """Run in the child: log a CNN whose int8 variant fails parity, register it, write ids."""
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("CHIMERA_BENCH_MAX_SECONDS", "0.15")
    import mlflow
    import mlflow.chimera  # noqa: F401

    import models

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment("chimera-ui")
    info = mlflow.chimera.log_model(
        models.cnn(), name="cnn", input_example=models.examples()["cnn"], registered_model_name=MODEL_NAME,
        backends=["onnxruntime", "eager"], tolerances={"int8": {"atol": 1e-7, "rtol": 1e-7}},
    )
    conf = info.flavors["chimera"]
    run_tags = mlflow.MlflowClient().get_run(info.run_id).data.tags
    fastest = run_tags[f"chimera.fastest.{conf['build_host_class']}"]
    Path(out).write_text(json.dumps({
        "experiment_id": experiment.experiment_id, "run_id": info.run_id, "model_id": info.model_id,
        "version": str(info.registered_model_version), "host_class": conf["build_host_class"],
        "statuses": {vid: e["status"] for vid, e in conf["variants"].items()}, "fastest": fastest,
    }))


# -- driving the UI --------------------------------------------------------------------------


@pytest.fixture
def page(browser, request):
    """A fresh page; if the test fails, its screenshot is saved as ``<test name>-FAILED.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    failures_before = request.session.testsfailed
    context = browser.new_context(viewport={"width": 1500, "height": 1300})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    if request.session.testsfailed > failures_before:
        page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}-FAILED.png"), full_page=True)
    context.close()


def _open(page, url: str, wait_for: str) -> None:
    """Open a UI route, wait until ``wait_for`` is on screen, close the assistant side panel."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text(wait_for, exact=True).first).to_be_visible()
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


def _visible(page_or_frame, text: str, exact: bool = False) -> None:
    from playwright.sync_api import expect

    expect(page_or_frame.get_by_text(text, exact=exact).first).to_be_visible()


def _shot(page, name: str) -> None:
    page.wait_for_timeout(500)  # let the last render settle
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_run_page_shows_variant_tags_metrics_and_summary(page, server, logged):
    failed = [vid for vid, status in logged["statuses"].items() if status == "failed_parity"]
    assert failed == ["onnxruntime-int8-cpu"]
    run_url = f"{server}/#/experiments/{logged['experiment_id']}/runs/{logged['run_id']}"
    _open(page, run_url, "chimera.variants")
    # Tags: every variant with its status, the fastest here, what built them.
    _visible(page, "failed parity: onnxruntime-int8-cpu")
    _visible(page, f"chimera.fastest.{logged['host_class']}", exact=True)
    _visible(page, f"chimera.status.{logged['fastest']}", exact=True)
    _visible(page, "chimera.built_with", exact=True)
    # The description answers the questions in words; the metrics are listed measure by measure.
    _visible(page, f"fastest on {logged['host_class']}")
    _visible(page, f"chimera.latency_p50_ms.batch_1/{logged['fastest']}", exact=True)
    _visible(page, "chimera.latency_p50_ms.batch_2/eager-fp32-cpu", exact=True)
    _shot(page, "1-run-overview.png")


def test_run_metric_charts_are_grouped_by_measure(page, server, logged):
    url = f"{server}/#/experiments/{logged['experiment_id']}/runs/{logged['run_id']}/model-metrics"
    _open(page, url, "chimera.latency_p50_ms.batch_1")
    for section in ("chimera.latency_p99_ms.batch_1", "chimera.parity_max_abs_err", "chimera.size_mb"):
        _visible(page, section)
    _visible(page, logged["fastest"], exact=True)  # each chart is titled with its variant
    _shot(page, "2-run-metric-charts.png")


def test_logged_model_page_shows_summary_and_metrics(page, server, logged):
    url = f"{server}/#/experiments/{logged['experiment_id']}/models/{logged['model_id']}"
    _open(page, url, f"chimera.latency_p50_ms.batch_1/{logged['fastest']}")
    _visible(page, "mlflow-chimera", exact=True)  # the description's first words
    _visible(page, f"fastest on {logged['host_class']}")
    _visible(page, "chimera.parity_max_abs_err/onnxruntime-int8-cpu", exact=True)
    _shot(page, "3-logged-model.png")


def test_report_and_chart_open_in_the_artifact_viewer(page, server, logged):
    from playwright.sync_api import expect

    url = f"{server}/#/experiments/{logged['experiment_id']}/models/{logged['model_id']}/artifacts"
    _open(page, url, "report")
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("chimera-report.html", exact=True).first.click()
    frame = page.frame_locator("iframe.mlflow-html-iframe")
    _visible(frame, "At a glance", exact=True)
    _visible(frame, f"Fastest on {logged['host_class']}")
    _visible(frame, "Built with")
    for vid in logged["statuses"]:
        _visible(frame, vid, exact=True)
    _visible(frame, "failed parity", exact=True)
    expect(frame.locator("img[src^='data:image/png;base64,']")).to_be_visible()
    _shot(page, "4-report-html.png")

    page.get_by_text("chimera-latency.png", exact=True).first.click()
    chart = page.locator("img[alt='report/chimera-latency.png']")
    expect(chart).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 500", arg=chart.element_handle())
    _shot(page, "5-report-chart.png")


def test_model_version_page_shows_tags_and_summary(page, server, logged):
    _open(page, f"{server}/#/models/{MODEL_NAME}/versions/{logged['version']}",
          f"chimera.fastest.{logged['host_class']}")
    _visible(page, logged["fastest"], exact=True)  # the fastest tag's value
    _visible(page, "chimera.built_with", exact=True)
    _visible(page, f"fastest on {logged['host_class']}")  # the description
    _visible(page, "onnxruntime-int8-cpu")
    _shot(page, "6-model-version.png")
    # The tag table scrolls inside itself: bring the per-variant status tags into view.
    status = page.get_by_text("chimera.status.onnxruntime-int8-cpu", exact=True)
    status.scroll_into_view_if_needed()
    _visible(page, "chimera.status.onnxruntime-int8-cpu", exact=True)
    _visible(page, "chimera.variants", exact=True)
    _shot(page, "7-model-version-status-tags.png")


if __name__ == "__main__":  # the child process of the `logged` fixture
    _log_model(sys.argv[1], sys.argv[2])
