"""log_model → registry → pyfunc load → predict, on real MLflow stores and real runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import models

KINDS = ["mlp", "cnn", "transformer", "two_in_two_out", "tuple_out"]


def _as_list(pred) -> list:
    return list(pred.values()) if isinstance(pred, dict) else [pred]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("cnn", "transformer") else k
                                  for k in KINDS])  # the CNN and transformer take ~8 s each to log
def test_pyfunc_predicts_like_eager_torch_at_several_batches(logged, kind):
    info, model, _, name = logged.get(kind)
    pyfunc_model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    raw = pyfunc_model.get_raw_model()
    tol = 0.15 if raw.variant.precision == "int8" else 1e-4
    for batch in (1, 3, 17):
        example = models.examples(batch=batch, seed=batch)[kind]
        expected = models.eager_outputs(model, example)
        got = _as_list(pyfunc_model.predict(example))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, atol=tol, rtol=1e-3)


def test_multi_output_model_returns_named_outputs(logged):
    _, model, example, name = logged.get("two_in_two_out")
    pred = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(example)
    assert set(pred) == {"score", "embedding"}
    assert pred["score"].shape == (2, 1) and pred["embedding"].shape == (2, 4)
    tuple_pred = mlflow.pyfunc.load_model(f"models:/{logged.get('tuple_out')[3]}/1").predict(
        models.examples()["tuple_out"]
    )
    assert set(tuple_pred) == {"output_0", "output_1"}


def test_model_directory_layout_and_provenance(logged, tmp_path):
    info, _, _, name = logged.get("mlp")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow_chimera"
    conf = mlmodel["flavors"]["chimera"]
    # Payloads live in the run's artifacts, fetched on demand; the model directory is small.
    assert conf["reference"]["uri"] == f"runs:/{info.run_id}/chimera/reference/program.pt2"
    assert not (local / conf["reference"]["path"]).exists()
    assert set(conf["variants"]) >= {"onnxruntime-fp32-cpu", "onnxruntime-int8-cpu", "eager-fp32-cpu"}
    variant = json.loads((local / "variants/onnxruntime-fp32-cpu/variant.json").read_text())
    prov = variant["provenance"]
    assert prov["exporter"] in ("dynamo", "legacy")
    assert prov["compiler_version"].startswith("2.")
    assert prov["reference_sha256"] == conf["reference"]["sha256"]
    assert prov["build_host"]["host_class"] == conf["build_host_class"]
    assert prov["build_seconds"] > 0 and "opset" in prov
    assert prov["session_options"]["graph_optimization_level"] == "all"
    assert set(variant["files"]) == {"model.onnx"} and len(variant["files"]["model.onnx"]) == 64
    assert variant["location"] == f"runs:/{info.run_id}/chimera/variants/onnxruntime-fp32-cpu"
    assert variant["parity"]["passed"] is True
    batches = {c["batch"] for c in variant["parity"]["checks"]}
    assert {1, 2} <= batches and max(batches) >= 16  # example batch, batch 1 and a larger one
    latency = variant["benchmarks"][0]["latency_ms"]
    assert set(latency) == {"1", "2"} and all(v["p50"] > 0 for v in latency.values())
    assert latency["1"]["p50"] <= latency["1"]["p90"] <= latency["1"]["p99"]
    # Timed side by side with the other variants, with the thread counts recorded.
    bench = variant["benchmarks"][0]
    assert bench["method"] == "interleaved" and bench["threads"]["torch_intra_op"] >= 1
    assert latency["1"]["noise"] is not None and latency["1"]["noise"] >= 0
    eager = json.loads((local / "variants/eager-fp32-cpu/variant.json").read_text())["benchmarks"][0]
    assert eager["measured_at"] == bench["measured_at"]  # one measurement for every variant
    assert eager["latency_ms"]["1"]["windows"] in range(latency["1"]["windows"] - 1, latency["1"]["windows"] + 2)
    # The dynamic batch survives a batch-2 example; the signature has a -1 batch.
    assert json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"]["shape"] == [-1, 64]


def test_requirements_list_what_the_variants_need(tracking_uri, tmp_path):
    model = models.mlp()
    info = mlflow.chimera.log_model(model, name="ort-only", input_example=models.examples()["mlp"],
                                    backends=["onnxruntime"], precisions=["fp32"])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("onnxruntime==") for r in reqs)
    assert any(r.startswith("mlflow-chimera==") for r in reqs)
    assert not any(r.startswith("torch") for r in reqs), reqs
    assert set(info.flavors["chimera"]["variants"]) == {"onnxruntime-fp32-cpu", "onnxruntime-fp32-cpu-noopt"}


def test_batch_one_example_still_gives_a_dynamic_batch(tracking_uri):
    model = models.mlp()
    x1 = models.examples(batch=1)["mlp"]
    info = mlflow.chimera.log_model(model, name="b1", input_example=x1, precisions=["fp32"],
                                    backends=["onnxruntime"])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    x9 = models.examples(batch=9)["mlp"]
    np.testing.assert_allclose(loaded.predict(x9), models.eager_outputs(model, x9)[0], atol=1e-4)


def test_metrics_and_tags_on_run_logged_model_and_version(logged):
    info, _, _, name = logged.get("cnn")
    conf = info.flavors["chimera"]
    client = MlflowClient()
    run = client.get_run(info.run_id)
    assert run.data.tags["chimera.reference_sha256"] == conf["reference"]["sha256"]
    assert "passed: onnxruntime-fp32-cpu" in run.data.tags["chimera.variants"]
    assert run.data.tags["chimera.status.onnxruntime-fp32-cpu"].startswith("passed · p50 ")
    assert "torch" in run.data.tags["chimera.built_with"]
    assert "chimera.host_class" in run.data.tags  # the run context provider
    # Metrics: one section per measure (before the "/"), one entry per variant.
    assert run.data.metrics["chimera.latency_p50_ms.batch_1/onnxruntime-fp32-cpu"] > 0
    assert run.data.metrics["chimera.latency_p99_ms.batch_2/onnxruntime-fp32-cpu"] > 0
    assert "chimera.parity_max_abs_err/onnxruntime-fp32-cpu" in run.data.metrics
    assert "chimera.parity_max_rel_err/onnxruntime-int8-cpu" in run.data.metrics
    assert run.data.metrics["chimera.size_mb/onnxruntime-fp32-cpu"] > 0
    assert run.data.metrics["chimera.size_mb/eager-fp32-cpu"] > 0  # the reference program it runs
    assert "chimera.seconds_to_build/onnxruntime-fp32-cpu" in run.data.metrics
    assert run.data.tags["mlflow.note.content"].startswith("**mlflow-chimera** model `cnn-")
    logged_model = client.get_logged_model(info.model_id)
    assert logged_model.tags["chimera.build_host_class"] == conf["build_host_class"]
    assert "fastest on" in logged_model.tags["mlflow.note.content"]
    assert {m.key for m in logged_model.metrics} >= {"chimera.latency_p50_ms.batch_1/eager-fp32-cpu"}
    version = client.get_model_version(name, "1")
    assert version.tags["chimera.reference_sha256"] == run.data.tags["chimera.reference_sha256"]
    assert version.tags["chimera.variants"] == run.data.tags["chimera.variants"]
    fastest = [k for k in version.tags if k.startswith("chimera.fastest.")]
    assert fastest == [f"chimera.fastest.{conf['build_host_class']}"]
    assert version.tags[fastest[0]] in conf["variants"]
    assert version.description.startswith("**mlflow-chimera**")


def test_log_model_params_tags_and_metadata_are_passed_through(tracking_uri):
    info = mlflow.chimera.log_model(models.mlp(), name="passthrough", input_example=models.examples()["mlp"],
                                    backends=["onnxruntime"], precisions=["fp32"],
                                    params={"lr": 0.1}, tags={"team": "search"},
                                    metadata={"owner": "me"})
    logged_model = MlflowClient().get_logged_model(info.model_id)
    assert logged_model.tags["team"] == "search" and logged_model.params["lr"] == "0.1"
    assert info.metadata == {"owner": "me"}


def test_load_model_returns_the_raw_chimera_model(logged):
    info, model, example, _ = logged.get("mlp")
    raw = mlflow.chimera.load_model(info.model_uri)
    assert raw.variant.id in info.flavors["chimera"]["variants"]
    assert "chosen:" in raw.explain()
    assert raw.predict(example).shape == (2, 10)


def test_model_config_at_log_time_is_the_default_a_loader_can_override(tracking_uri):
    model, x = models.mlp(), models.examples()["mlp"]
    info = mlflow.chimera.log_model(model, name="int8-by-default", input_example=x, backends=["onnxruntime"],
                                    model_config={"precision": "int8"})
    assert mlflow.chimera.load_model(info.model_uri).variant.precision == "int8"
    loaded = mlflow.pyfunc.load_model(info.model_uri, model_config={"precision": "fp32"})
    assert loaded.get_raw_model().variant.precision == "fp32"
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"model_config keys \['precison'\]"):
        mlflow.chimera.log_model(model, name="typo", input_example=x, model_config={"precison": "int8"})
    with pytest.raises(mlflow.exceptions.MlflowException, match="max_abs_err -1 is not a positive number"):
        mlflow.chimera.log_model(model, name="bad-bound", input_example=x, model_config={"max_abs_err": -1})


def test_input_example_is_required(tracking_uri):
    with pytest.raises(mlflow.exceptions.MlflowException, match="input_example"):
        mlflow.chimera.log_model(models.mlp(), name="no-example")


def test_unknown_backend_is_a_clear_error(tracking_uri):
    with pytest.raises(ValueError, match="backend 'tensorrtx' is not registered.*onnxruntime"):
        mlflow.chimera.log_model(models.mlp(), name="bad-backend", input_example=models.examples()["mlp"],
                                 backends=["tensorrtx"])


def test_mlflow_flavor_conventions_conda_env_code_paths_and_extra_files(tmp_path):
    from mlflow_chimera.manifest import sha256_file

    helper = tmp_path / "chimera_test_helper.py"
    helper.write_text("ANSWER = 42\n")
    notes = tmp_path / "labels.txt"
    notes.write_text("cat\ndog\n")
    conda_env = {"name": "serve", "channels": ["conda-forge"],
                 "dependencies": ["python=3.11", "pip", {"pip": ["mlflow-chimera", "onnxruntime==1.32.0"]}]}
    path = tmp_path / "model"
    mlflow.chimera.save_model(models.mlp(), str(path), input_example=models.examples()["mlp"],
                              backends=["onnxruntime"], precisions=["fp32"], conda_env=conda_env,
                              code_paths=[str(helper)], extra_files=[str(notes)])
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    conf = mlmodel["flavors"]["chimera"]
    assert (path / "code" / helper.name).read_text() == "ANSWER = 42\n"
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert conf["extra_files"] == [{"path": "extra_files/labels.txt"}]
    assert (path / "extra_files" / "labels.txt").read_text() == "cat\ndog\n"
    # Pinned by the manifest that the anchor covers.
    assert conf["attached_files"] == {"code/chimera_test_helper.py": sha256_file(helper),
                                      "extra_files/labels.txt": sha256_file(notes)}
    assert "onnxruntime==1.32.0" in (path / "requirements.txt").read_text()
    assert yaml.safe_load((path / "conda.yaml").read_text())["channels"] == ["conda-forge"]
    assert mlflow.pyfunc.load_model(str(path)).predict(models.examples()["mlp"]).shape == (2, 10)


def test_unknown_keyword_arguments_are_refused_before_anything_is_logged(tracking_uri, tmp_path):
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"unexpected keyword argument\(s\) \['backend'\]"):
        mlflow.chimera.log_model(models.mlp(), name="typo", input_example=models.examples()["mlp"],
                                 backend=["onnxruntime"])
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"unexpected keyword argument\(s\) \['precision'\]"):
        mlflow.chimera.save_model(models.mlp(), str(tmp_path / "m"), input_example=models.examples()["mlp"],
                                  precision="fp32")
    with pytest.raises(mlflow.exceptions.MlflowException, match="conda_env"):
        mlflow.chimera.save_model(models.mlp(), str(tmp_path / "m2"), input_example=models.examples()["mlp"],
                                  conda_env={"dependencies": []}, pip_requirements=["onnxruntime"])
