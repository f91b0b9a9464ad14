"""Compiling on a target host and publishing to the same model: what loaders then see,
concurrency and idempotency. Real sqlite store, real processes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import models
from fleet import COMPILE, LOAD_AND_PREDICT, assert_fastest_or_tied, cached_files, run_as_host
from mlflow_chimera.publish import PUBLISHED_TAG_PREFIX


def _log_int8_only(name):
    """A CNN with only its ONNX Runtime int8 variant (slow on convolutions): a variant published
    later (eager) is faster on this host."""
    model = models.cnn()
    mlflow.chimera.log_model(model, name=name, input_example=models.examples()["cnn"], registered_model_name=name,
                             backends=["onnxruntime"], precisions=["int8"], benchmark={"max_seconds": 0.2})
    return model


@pytest.mark.slow  # ~1 min: four publishing hosts at once, then a fifth
def test_four_publishers_racing_lose_nothing_and_compiling_again_is_idempotent(tracking_uri, tmp_path):
    """Issue #17's figure: 4 concurrent `chimera compile` publishers to one model lost nothing."""
    name = "race"
    model = _log_int8_only(name)
    uri = f"models:/{name}/1"
    jobs = [(["eager"], ["fp32"]), (["onnxruntime"], ["fp32"]), (["openvino"], ["fp32"]),
            (["torch_compile"], ["fp32"])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(
            lambda job: run_as_host(COMPILE.format(uri=uri, backends=job[0], precisions=job[1]), tracking_uri,
                                    tmp_path / f"cache-{job[0][0]}"), jobs))
    published = {vid for r in results for vid in r["published"]}
    assert published == {"eager-fp32-cpu", "onnxruntime-fp32-cpu", "onnxruntime-fp32-cpu-noopt",
                         "openvino-fp32-cpu", "torch_compile-fp32-cpu"}
    assert len({r["run_id"] for r in results}) == len(jobs)  # each publisher writes its own artifacts

    client = MlflowClient()
    model_id = mlflow.models.get_model_info(uri).model_id
    tags = client.get_logged_model(model_id).tags
    assert {k[len(PUBLISHED_TAG_PREFIX):] for k in tags if k.startswith(PUBLISHED_TAG_PREFIX)} == published
    # The model's summary now covers the published variants too (report, status tags).
    assert all(f"chimera.status.{vid}" in tags for vid in published)
    assert "eager-fp32-cpu" in tags["chimera.variants"]
    version_tags = client.get_model_version(name, "1").tags
    assert {k for k in version_tags if k.startswith(PUBLISHED_TAG_PREFIX)} == \
        {k for k in tags if k.startswith(PUBLISHED_TAG_PREFIX)}

    again = run_as_host(COMPILE.format(uri=uri, backends=["eager"], precisions=["fp32"]), tracking_uri,
                        tmp_path / "cache-again")
    assert again["published"] == [] and again["skipped"] == {"eager-fp32-cpu": "already in the model"}
    assert client.get_logged_model(model_id).tags == tags

    loaded = mlflow.pyfunc.load_model(uri)
    ids = {v.id for v in loaded.get_raw_model().variants}
    assert ids == published | {"onnxruntime-int8-cpu"}
    x = models.examples(batch=2, seed=3)["cnn"]
    for vid in published:
        forced = mlflow.pyfunc.load_model(uri, model_config={"variant": vid})
        np.testing.assert_allclose(forced.predict(x), models.eager_outputs(model, x)[0], atol=1e-4)


@pytest.mark.slow  # ~25 s: compile and load as other hosts
def test_loader_picks_a_published_variant_and_fetches_only_it(tracking_uri, tmp_path):
    name = "fleet-local"
    _log_int8_only(name)
    client = MlflowClient()
    client.set_registered_model_alias(name, "prod", "1")
    compiled = run_as_host(COMPILE.format(uri=f"models:/{name}@prod", backends=["eager"], precisions=["fp32"]),
                           tracking_uri, tmp_path / "compile-host-cache")
    assert compiled["published"] == ["eager-fp32-cpu"]

    cache = tmp_path / "serving-host-cache"
    loaded = run_as_host(LOAD_AND_PREDICT.format(uri=f"models:/{name}@prod", kind="cnn"), tracking_uri, cache)
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    logged_p50 = info.flavors["chimera"]["variants"]["onnxruntime-int8-cpu"]["p50_ms"]["1"]
    published_p50 = compiled["variants"]["eager-fp32-cpu"]["p50_ms"]["1"]
    assert_fastest_or_tied(loaded["variant"], loaded["explain"],
                           {"eager-fp32-cpu": published_p50, "onnxruntime-int8-cpu": logged_p50})
    # Only the chosen variant's files reached this host's cache.
    expected_files = {"program.pt2"} if loaded["variant"] == "eager-fp32-cpu" else {"model.onnx"}
    assert cached_files(cache) == expected_files
