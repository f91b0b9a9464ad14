"""The fleet workflow end to end on a tracking server whose artifacts live in S3.

`mlflow server` (sqlite backend store) proxies artifacts to a local S3-compatible server
(moto in server mode) on 127.0.0.1. One process logs a model with ONNX Runtime variants only;
a second "host" (its own process and cache) compiles another backend and publishes it; a fresh
process loads models:/name@alias, selects by its own host's ranking and fetches only the
variant it runs."""

from __future__ import annotations

import sys

import boto3
import pytest

import servers
from fleet import COMPILE, LOAD_AND_PREDICT, assert_fastest_or_tied, cached_files, run_as_host

pytestmark = pytest.mark.slow

BUCKET = "chimera-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

LOG_ORT_ONLY = """
import json
import mlflow, mlflow.chimera
import models
mlflow.set_experiment("fleet")
info = mlflow.chimera.log_model(models.cnn(), name="cnn", input_example=models.examples()["cnn"],
                                registered_model_name="fleet-cnn", backends=["onnxruntime"],
                                precisions=["int8"], benchmark={"max_seconds": 0.2})
mlflow.MlflowClient().set_registered_model_alias("fleet-cnn", "prod", info.registered_model_version)
print(json.dumps({"model_id": info.model_id, "variants": info.flavors["chimera"]["variants"]}))
"""


@pytest.fixture(scope="module")
def s3_tracking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    s3_port = servers.free_port()
    s3_env = servers.venv_env(S3_ENV)
    with servers.running([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                         s3_port, "/moto-api/", s3_env, "local S3 server (moto)", timeout=60) as s3:
        boto3.client("s3", endpoint_url=s3.url, **_boto_creds()).create_bucket(Bucket=BUCKET)
        port = servers.free_port()
        env = servers.venv_env({**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.url,
                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "-h", "127.0.0.1", "-p", str(port),
               "--workers", "1"]
        with servers.running(cmd, port, "/health", env, "mlflow server", timeout=180) as server:
            yield server.url, s3.url, root


def _boto_creds() -> dict:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def test_compile_on_a_second_host_and_load_only_what_runs(s3_tracking_server):
    tracking_uri, s3_url, root = s3_tracking_server
    logged = run_as_host(LOG_ORT_ONLY, tracking_uri, root / "cache-training")
    assert set(logged["variants"]) == {"onnxruntime-int8-cpu"}

    compiled = run_as_host(COMPILE.format(uri="models:/fleet-cnn@prod", backends=["eager"], precisions=["fp32"]),
                           tracking_uri, root / "cache-compile-host")
    assert compiled["published"] == ["eager-fp32-cpu"]
    assert compiled["variants"]["eager-fp32-cpu"]["status"] == "ready"

    # Every payload is in the S3 bucket, behind the tracking server.
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_url, **_boto_creds())
            .list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith("chimera/variants/onnxruntime-int8-cpu/model.onnx") for k in keys)
    assert any(k.endswith("chimera/reference/program.pt2") for k in keys)
    assert any(k.endswith("chimera/variants/eager-fp32-cpu/variant.json") for k in keys)

    cache = root / "cache-serving-host"
    loaded = run_as_host(LOAD_AND_PREDICT.format(uri="models:/fleet-cnn@prod", kind="cnn"), tracking_uri, cache)
    int8_p50 = logged["variants"]["onnxruntime-int8-cpu"]["p50_ms"]["1"]
    eager_p50 = compiled["variants"]["eager-fp32-cpu"]["p50_ms"]["1"]
    assert_fastest_or_tied(loaded["variant"], loaded["explain"],
                           {"eager-fp32-cpu": eager_p50, "onnxruntime-int8-cpu": int8_p50})
    assert cached_files(cache) == ({"program.pt2"} if loaded["variant"] == "eager-fp32-cpu" else {"model.onnx"})
    assert len(loaded["pred"]) == 3 and len(loaded["pred"][0]) == 10
