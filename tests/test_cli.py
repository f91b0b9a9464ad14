"""The ``chimera`` command, in-process (click's CliRunner) and as the installed script, against
models logged to the session's real sqlite tracking store."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

from mlflow_chimera import host as host_mod
from mlflow_chimera.cli import cli


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch, tracking_uri):
    """The CLI sets environment variables and a log level for its process; in-process runs
    must not leak them into other tests."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                       os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"))
    logger = logging.getLogger("mlflow.chimera")
    level = logger.level
    yield
    logger.setLevel(level)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def mlp(logged):
    info, _, _, name = logged.get("mlp")
    conf = info.flavors["chimera"]
    return types.SimpleNamespace(uri=f"models:/{name}/1", name=name, info=info, conf=conf,
                                 ids=set(conf["variants"]))


def _row(table: str, vid: str) -> str:
    return next(line for line in table.splitlines() if line.split(" ")[0] == vid)


# -- variants ----------------------------------------------------------------------------------


def test_variants_table_lists_every_variant(mlp):
    result = invoke("variants", mlp.uri)
    assert result.exit_code == 0, result.output
    out = result.stdout
    header = next(line for line in out.splitlines() if line.startswith("variant "))
    for column in ("backend", "precision", "built on", "parity", "max abs err", "p50 ms @ batch 1",
                   "size", "status"):
        assert column in header
    for vid, entry in mlp.conf["variants"].items():
        row = _row(out, vid)
        assert entry["backend"] in row and entry["precision"] in row
        assert mlp.conf["build_host_class"] in row
        assert ("passed" in row) == (entry["status"] == "ready")
    assert "#1" in out  # this host's first choice is marked


def test_variants_json_has_every_variant_with_its_parity(mlp):
    result = invoke("variants", mlp.uri, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_id"] == mlp.info.model_id
    assert data["host_class"] == host_mod.fingerprint().host_class
    rows = {r["id"]: r for r in data["variants"]}
    assert set(rows) == mlp.ids
    for vid, entry in mlp.conf["variants"].items():
        row = rows[vid]
        assert row["parity"] == ("passed" if entry["status"] == "ready" else row["parity"])
        assert row["max_abs_err"] == pytest.approx(entry["parity_max_abs"], abs=1e-12)
        assert row["built_on"] == mlp.conf["build_host_class"]
        assert row["status"] == entry["status"]
        if entry["status"] == "ready":
            assert row["p50_ms"] > 0 and row["p50_batch"] == 1
            assert row["p50_measured_here"] is True  # built and measured on this host
            assert row["runs_here"] is True
            if entry["precision"] == "fp32":  # lossy variants rank only on request
                assert row["rank_here"] >= 1
    # Sizes: ONNX files (listed where they were stored); eager runs the reference program.
    assert rows["onnxruntime-fp32-cpu"]["size_bytes"] > 1000
    assert rows["eager-fp32-cpu"]["size_note"] == "reference program"
    assert rows["eager-fp32-cpu"]["size_bytes"] > 1000
    assert rows["onnxruntime-int8-cpu"]["size_bytes"] < rows["onnxruntime-fp32-cpu"]["size_bytes"]


def test_variants_labels_timings_from_the_build_host(mlp, monkeypatch):
    real = host_mod.fingerprint()
    other = dataclasses.replace(real, cpu_count=real.cpu_count + 95)  # a host class nobody measured
    monkeypatch.setattr(host_mod, "fingerprint", lambda: other)
    data = json.loads(invoke("variants", mlp.uri, "--json").stdout)
    assert data["host_class"] == other.host_class != real.host_class
    for row in data["variants"]:
        if row["status"] == "ready":
            assert row["p50_measured_here"] is False
            assert row["p50_host_class"] == mlp.conf["build_host_class"]
    table = invoke("variants", mlp.uri).stdout
    assert "(build host)" in _row(table, "onnxruntime-fp32-cpu")


# -- explain -----------------------------------------------------------------------------------


def test_explain_names_the_chosen_variant_and_why_not_the_others(mlp):
    result = invoke("explain", mlp.uri)
    assert result.exit_code == 0, result.output
    chosen = re.search(r"^chosen: (\S+)", result.stdout, re.M).group(1)
    assert chosen in mlp.ids
    for vid in mlp.ids:
        assert vid in result.stdout

    data = json.loads(invoke("explain", mlp.uri, "--json").stdout)
    assert data["chosen"] == chosen == data["ranking"][0]["id"]
    assert all(r["basis"] for r in data["ranking"])
    assert data["skipped"] == [] and data["forced"] is None

    restricted = json.loads(invoke("explain", mlp.uri, "--backend", "onnxruntime", "--json").stdout)
    assert restricted["chosen"].startswith("onnxruntime-")
    assert restricted["rejected"]["eager-fp32-cpu"] == "model_config asks for backend 'onnxruntime'"
    assert set(restricted["rejected"]) | {r["id"] for r in restricted["ranking"]} == mlp.ids


def test_explain_with_a_forced_variant(mlp):
    result = invoke("explain", mlp.uri, "--variant", "onnxruntime-int8-cpu")
    assert result.exit_code == 0, result.output
    assert "chosen: onnxruntime-int8-cpu (forced by model_config" in result.stdout
    for vid in mlp.ids - {"onnxruntime-int8-cpu"}:
        assert f"{vid}: model_config forces variant 'onnxruntime-int8-cpu'" in result.stdout
    data = json.loads(invoke("explain", mlp.uri, "--variant", "eager-fp32-cpu", "--json").stdout)
    assert data["chosen"] == data["forced"] == "eager-fp32-cpu"
    assert set(data["rejected"]) == mlp.ids - {"eager-fp32-cpu"}


def test_explain_when_nothing_matches_exits_1_with_the_explanation(mlp):
    result = invoke("explain", mlp.uri, "--precision", "fp16")
    assert result.exit_code == 1
    assert "model_config asks for precision 'fp16'" in result.stdout
    assert "no variant of this model can run on this host" in one_line_error(result.stderr)


# -- failures ----------------------------------------------------------------------------------


def test_bad_variant_exits_1_naming_the_variants(mlp):
    result = invoke("explain", mlp.uri, "--variant", "no-such-variant")
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert "no-such-variant" in line
    for vid in mlp.ids:
        assert vid in line
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["variants", "explain", "bench"])
def test_unknown_model_exits_1_with_one_line(tracking_uri, command):
    result = invoke(command, "models:/no-such-model/1")
    assert result.exit_code == 1
    assert "no-such-model" in one_line_error(result.stderr)


def test_paths_that_are_not_chimera_models(tmp_path):
    result = invoke("variants", tmp_path / "missing")
    assert result.exit_code == 1
    assert "neither a model directory nor a model URI" in one_line_error(result.stderr)
    result = invoke("variants", tmp_path)
    assert result.exit_code == 1
    assert "no MLmodel" in one_line_error(result.stderr)
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function: {}\n")
    result = invoke("explain", tmp_path)
    assert result.exit_code == 1
    assert "not a chimera model" in one_line_error(result.stderr)


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(cli, ["--debug", "variants", "models:/no-such-model/1"])
    assert result.exit_code == 1
    assert result.exception is not None and type(result.exception).__name__ == "MlflowException"


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_json_describes_the_host_and_backends():
    from mlflow_chimera import backends

    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("os", "arch", "cpu_model", "cpu_count", "isa", "isa_level", "host_class", "gpus",
                "driver", "libraries", "cxx", "backends", "onnxruntime_providers"):
        assert key in data, key
    assert data["host_class"] == host_mod.fingerprint().host_class
    assert {"torch", "onnxruntime", "onnx", "onnxscript", "tensorrt", "mlflow"} <= set(data["libraries"])
    assert data["libraries"]["mlflow"].startswith("3.")
    assert set(data["backends"]) == set(backends.names())
    for name, entry in data["backends"].items():
        assert isinstance(entry["can_build"], bool) and isinstance(entry["can_run"], bool)
        assert entry["can_build"] == (entry["build_reason"] is None), name
    # This test environment has the full build extra.
    assert data["backends"]["onnxruntime"]["can_build"] and data["backends"]["eager"]["can_run"]
    assert "CPUExecutionProvider" in data["onnxruntime_providers"]

    table = invoke("doctor").stdout
    assert "host class" in table and "backend" in table and "onnxruntime" in table


def test_doctor_does_not_import_torch_or_mlflow():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "mlflow_chimera.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "click" in imported
    assert "torch" not in imported and "mlflow" not in imported
    assert json.loads(out.stdout)["host_class"]


# -- bench -------------------------------------------------------------------------------------


def test_bench_json_stores_and_returns_figures(mlp):
    from mlflow.tracking import MlflowClient

    host_class = host_mod.fingerprint().host_class
    result = invoke("bench", mlp.uri, "--max-seconds", "0.05", "--batch", "1", "--batch", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["host_class"] == host_class
    assert mlp.info.model_id in data["stored"] and f"{host_class}.json" in data["stored"]
    ready = {vid for vid, e in mlp.conf["variants"].items() if e["status"] == "ready"}
    assert set(data["variants"]) == ready
    for vid, entry in data["variants"].items():
        assert set(entry["latency_ms"]) == {"1", "3"}
        for figures in entry["latency_ms"].values():
            assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"]
    stored = {os.path.basename(f.path) for f in
              MlflowClient().list_logged_model_artifacts(mlp.info.model_id, "benchmarks")}
    assert f"{host_class}.json" in stored
    # The stored figures are what `variants` now shows for this host class.
    rows = {r["id"]: r for r in json.loads(invoke("variants", mlp.uri, "--json").stdout)["variants"]}
    for vid, entry in data["variants"].items():
        assert rows[vid]["p50_ms"] == pytest.approx(entry["latency_ms"]["1"]["p50"])


def test_bench_stores_batch_1_too_since_selection_ranks_by_it(tmp_path, mlp):
    import mlflow

    local = mlflow.artifacts.download_artifacts(mlp.uri, dst_path=str(tmp_path))  # a local copy
    result = invoke("bench", local, "--max-seconds", "0.05", "--batch", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stored"] == os.path.join(local, "benchmarks", f"{data['host_class']}.json")
    assert os.path.isfile(data["stored"])
    assert all(set(e["latency_ms"]) == {"1", "4"} for e in data["variants"].values())
    assert "also timing batch 1" in result.stderr
    rows = json.loads(invoke("variants", local, "--json").stdout)["variants"]
    assert all(r["p50_measured_here"] for r in rows if r["status"] == "ready")


def test_bench_table_without_storing(mlp):
    result = invoke("bench", mlp.uri, "--max-seconds", "0.05", "--batch", "2", "--no-store")
    assert result.exit_code == 0, result.output
    assert "not stored (--no-store)" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("variant "))
    assert all(c in header for c in ("batch", "p50 ms", "p90 ms", "p99 ms"))
    assert "onnxruntime-fp32-cpu" in _row(result.stdout, "onnxruntime-fp32-cpu")


# -- compile -----------------------------------------------------------------------------------


def test_compile_command_calls_compile_model(monkeypatch):
    calls = []

    def compile_model(model_uri, backends=None, precisions=None, progress=None, signing_key_path=None):
        calls.append((model_uri, backends, precisions))
        progress("building onnxruntime-fp32-cpu")
        progress("publishing onnxruntime-fp32-cpu (ready)")
        return {"model_id": "m-123", "published": ["onnxruntime-fp32-cpu"],
                "skipped": {"eager-fp32-cpu": "already in the model"},
                "variants": {"onnxruntime-fp32-cpu": {"status": "ready", "p50_ms": {"1": 0.25, "8": 1.5}}}}

    fake = types.SimpleNamespace(compile_model=compile_model)
    monkeypatch.setitem(sys.modules, "mlflow_chimera.publish", fake)
    result = invoke("compile", "models:/clf/3", "--backend", "onnxruntime", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert calls == [("models:/clf/3", ["onnxruntime"], ["fp32"])]
    assert "chimera: building onnxruntime-fp32-cpu" in result.stderr  # progress goes to stderr
    assert "building" not in result.stdout
    assert re.search(r"onnxruntime-fp32-cpu\s+ready\s+0\.25\s+yes", result.stdout)
    assert "eager-fp32-cpu: already in the model" in result.stdout
    data = json.loads(invoke("compile", "models:/clf/3", "--json").stdout)
    assert data["published"] == ["onnxruntime-fp32-cpu"] and calls[-1] == ("models:/clf/3", None, None)


def test_compile_without_the_publish_module_exits_1(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow_chimera.publish", None)  # import fails
    result = invoke("compile", "models:/clf/3")
    assert result.exit_code == 1
    assert "not available" in one_line_error(result.stderr)


@pytest.mark.slow  # compiles and publishes a variant
def test_compile_publishes_new_variants_to_the_model(logged):
    _, _, _, name = logged.get("mlp", backends=["eager"])
    uri = f"models:/{name}/1"
    result = invoke("compile", uri, "--backend", "onnxruntime", "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["published"]) == {"onnxruntime-fp32-cpu", "onnxruntime-fp32-cpu-noopt"}
    assert "building onnxruntime-fp32-cpu" in result.stderr
    rows = {r["id"]: r for r in json.loads(invoke("variants", uri, "--json").stdout)["variants"]}
    assert rows["onnxruntime-fp32-cpu"]["published"] is True
    assert rows["eager-fp32-cpu"]["published"] is False
    assert rows["onnxruntime-fp32-cpu"]["parity"] == "passed"
    # Compiling again publishes nothing new.
    again = invoke("compile", uri, "--backend", "onnxruntime", "--precision", "fp32")
    assert again.exit_code == 0, again.output
    assert "published 0 variant(s)" in again.stdout


# -- the installed script ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chimera_script():
    path = os.path.join(os.path.dirname(sys.executable), "chimera")
    path = path if os.path.exists(path) else shutil.which("chimera")
    assert path, "the `chimera` script is not installed: run `pip install -e .`"
    return path


@pytest.mark.slow  # ~10 s: the installed script in subprocesses
def test_installed_script(chimera_script, mlp, tracking_uri):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run = lambda *args: subprocess.run([chimera_script, *args], capture_output=True, text=True,  # noqa: E731
                                       env=env, timeout=300)
    out = run("--tracking-uri", tracking_uri, "variants", mlp.uri, "--json")
    assert out.returncode == 0, out.stderr
    assert {r["id"] for r in json.loads(out.stdout)["variants"]} == mlp.ids

    out = run("--tracking-uri", tracking_uri, "explain", mlp.uri)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^chosen: \S+", out.stdout, re.M)

    out = run("--tracking-uri", tracking_uri, "explain", mlp.uri, "--variant", "nope")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "eager-fp32-cpu" in errors[0]

    out = run("--version")
    assert out.returncode == 0 and "chimera" in out.stdout
