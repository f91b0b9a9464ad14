"""Integrity: digests are checked before a variant is used, and the reference program is never
unpickled unrestricted."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

import models
from mlflow_chimera.manifest import IntegrityError, sha256_file
from mlflow_chimera.reference import load_program, validate_archive


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty artifact cache for this test, so variants are fetched from the store again."""
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def local_copy(logged, tmp_path, fresh_cache):
    """A writable local copy of the logged CNN's model directory."""
    info, model, example, name = logged.get("cnn")
    src = mlflow.artifacts.download_artifacts(f"models:/{name}/1")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst, model, info


def _stored_payload(info, variant_id: str) -> Path:
    """The variant's files in the run's artifact store (a local file store in these tests)."""
    artifact_root = mlflow.get_run(info.run_id).info.artifact_uri.removeprefix("file://")
    return Path(artifact_root, "chimera", "variants", variant_id)


def test_model_directory_holds_records_and_the_cache_only_what_runs(local_copy, fresh_cache):
    path, _, _ = local_copy
    assert not (path / "reference" / "program.pt2").exists()
    # The record, and its signature where a signing key was configured (as in these tests).
    assert {p.name for p in (path / "variants" / "onnxruntime-fp32-cpu").iterdir()} <= {"variant.json", "variant.sig"}
    chosen = mlflow.pyfunc.load_model(str(path)).get_raw_model().variant
    cached = [p for p in fresh_cache.rglob("*") if p.is_file()]
    assert {p.name for p in cached} == set(chosen.files)  # only the files its record lists
    # A second load re-uses the cached copy.
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    mlflow.pyfunc.load_model(str(path))
    assert {p: p.stat().st_mtime_ns for p in cached} == mtimes


def test_corrupted_variant_is_skipped_and_predictions_stay_correct(local_copy, caplog):
    path, model, info = local_copy
    first = mlflow.pyfunc.load_model(str(path)).get_raw_model().variant.id
    assert first != "eager-fp32-cpu"
    victim = _stored_payload(info, first) / "model.onnx"
    original = victim.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the artifact store
    victim.write_bytes(bytes(data))
    shutil.rmtree(os.environ["CHIMERA_CACHE_DIR"])
    try:
        with caplog.at_level(logging.WARNING, logger="mlflow.chimera"):
            loaded = mlflow.pyfunc.load_model(str(path))
    finally:
        victim.write_bytes(original)  # the session's other tests share this model
    raw = loaded.get_raw_model()
    assert raw.variant.id != first
    assert any(f"skipping variant {first}" in r.getMessage() and "sha256" in r.getMessage()
               for r in caplog.records)
    assert f"skipped {first}: failed to load: IntegrityError" in raw.explain()
    x = models.examples(batch=4, seed=7)["cnn"]
    tol = 0.15 if raw.variant.precision == "int8" else 1e-4
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(model, x)[0], atol=tol)


def test_damaged_cache_entry_is_fetched_again(local_copy, fresh_cache):
    path, _, _ = local_copy
    chosen = mlflow.pyfunc.load_model(str(path)).get_raw_model().variant
    cached = next(p for p in fresh_cache.rglob("*") if p.is_file() and p.name in chosen.files)
    cached.write_bytes(b"garbage")
    assert mlflow.pyfunc.load_model(str(path)).get_raw_model().variant.id == chosen.id
    assert cached.read_bytes() != b"garbage"


def test_tampered_variant_json_refuses_that_variant_only(local_copy):
    path, model, _ = local_copy
    vjson = path / "variants" / "onnxruntime-fp32-cpu" / "variant.json"
    vjson.write_text(vjson.read_text().replace('"ready"', '"ready" '))
    loaded = mlflow.pyfunc.load_model(str(path))
    raw = loaded.get_raw_model()
    assert raw.variant.id != "onnxruntime-fp32-cpu"
    assert "onnxruntime-fp32-cpu: refused:" in raw.explain() and "variant.json" in raw.explain()
    x = models.examples(batch=2, seed=3)["cnn"]
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(model, x)[0], atol=1e-4)


def _reference_program(info) -> Path:
    artifact_root = mlflow.get_run(info.run_id).info.artifact_uri.removeprefix("file://")
    return Path(artifact_root, "chimera", "reference", "program.pt2")


def test_reference_program_with_wrong_digest_is_not_loaded(local_copy):
    _, _, info = local_copy
    program = _reference_program(info)
    with pytest.raises(IntegrityError, match="expected"):
        load_program(program, "0" * 64)
    load_program(program, sha256_file(program))  # the recorded digest loads


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/chimera-pwned",))


def test_archive_with_a_malicious_pickle_is_refused(local_copy, tmp_path):
    good = _reference_program(local_copy[2])
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if "sample_inputs" in item.filename:
                payload = pickle.dumps(_Exploit())
            dst.writestr(item, payload)
    validate_archive(good)
    with pytest.raises(IntegrityError, match="sample_inputs.*weights_only"):
        validate_archive(evil)
    with pytest.raises(IntegrityError):
        load_program(evil, sha256_file(evil))
    assert not Path("/tmp/chimera-pwned").exists()
