"""Records as data written by someone else: unknown fields are tolerated, names and paths are
checked before anything uses them, and a malformed published tag loses only itself."""

from __future__ import annotations

import json

import pytest

from mlflow_chimera import backends
from mlflow_chimera.catalog import check_location, published_entries
from mlflow_chimera.manifest import IntegrityError, Variant, check_relative_path, check_variant_id

RECORD = {"id": "onnxruntime-fp32-cpu", "backend": "onnxruntime", "precision": "fp32", "target": "cpu",
          "files": {"model.onnx": "a" * 64},
          "parity": {"passed": True, "tolerance": {"atol": 1e-4, "rtol": 1e-3}, "criterion": "c", "checks": []},
          "benchmarks": [{"host_class": "h", "latency_ms": {"1": {"p50": 0.1}}}]}


def test_a_record_from_a_newer_chimera_with_unknown_fields_still_loads():
    newer = {**RECORD, "format_version": 9, "energy_joules": 0.3,
             "parity": {**RECORD["parity"], "task_metric": "accuracy"},
             "benchmarks": [{**RECORD["benchmarks"][0], "memory_mb": 12}]}
    variant = Variant.from_dict(newer)
    assert variant.id == RECORD["id"] and variant.parity.passed and variant.benchmarks[0].p50(1) == 0.1


@pytest.mark.parametrize("bad", ["../../evil", "a/b", "", "UPPER", "a..b", "/abs", None, 3])
def test_variant_ids_are_plain_names(bad):
    with pytest.raises(IntegrityError, match="invalid variant id"):
        check_variant_id(bad)
    with pytest.raises(IntegrityError):
        Variant.from_dict({**RECORD, "id": bad})


@pytest.mark.parametrize("bad", ["../secret", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "", "a/"])
def test_file_paths_are_relative_plain_and_normalised(bad):
    with pytest.raises(IntegrityError, match="invalid file path"):
        check_relative_path(bad)
    with pytest.raises(IntegrityError):
        Variant.from_dict({**RECORD, "files": {bad: "a" * 64}})


def test_digests_must_be_sha256_hex():
    with pytest.raises(IntegrityError, match="64 lower-case hex"):
        Variant.from_dict({**RECORD, "files": {"model.onnx": "../../x"}})


@pytest.mark.parametrize("uri", ["file:///etc", "/abs/path", "s3://bucket/x", "runs:/abc/chimera/variants/other",
                                 "runs:/abc/../../chimera/variants/v", "runs:/abc/chimera/variants/v/../w"])
def test_locations_point_into_the_tracking_servers_store_only(uri):
    with pytest.raises(IntegrityError, match="is not allowed"):
        check_location(uri, "v")
    assert check_location("runs:/abc/chimera/variants/v", "v")
    with pytest.raises(IntegrityError):
        check_location("runs:/abc/chimera/variants/v", "v", run_id="other")


def test_one_malformed_published_tag_loses_only_itself():
    good = {"uri": "runs:/abc/chimera/variants/good", "variant_json_sha256": "b" * 64}
    tags = {"chimera.variant.good": json.dumps(good), "chimera.variant.no-uri": json.dumps({"x": 1}),
            "chimera.variant.not-json": "{", "chimera.variant.sha": json.dumps({**good, "variant_json_sha256": "zz"}),
            "chimera.variant.../x": json.dumps(good), "unrelated": "1"}
    entries, malformed = published_entries(tags)
    assert entries == {"good": good}
    assert set(malformed) >= {"no-uri", "not-json", "sha"} and len(malformed) == 4


def test_only_registered_backends_are_looked_up():
    assert backends.get("onnxruntime").name == "onnxruntime"
    for name in ("os:abort", "subprocess:Popen", "mlflow_chimera.backends.eager:EagerBackend", "nope"):
        with pytest.raises(backends.UnknownBackendError, match="not registered"):
            backends.get(name)
