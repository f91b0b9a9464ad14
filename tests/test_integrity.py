"""Integrity: digests are checked before a variant is used, and the reference program is never
unpickled unrestricted."""

from __future__ import annotations

import io
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
def local_copy(logged, tmp_path):
    """A writable local copy of the logged CNN (loading from a path skips the registry)."""
    info, model, example, name = logged.get("cnn")
    src = mlflow.artifacts.download_artifacts(f"models:/{name}/1")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst, model, info


def test_corrupted_variant_is_skipped_and_predictions_stay_correct(local_copy, caplog):
    path, model, info = local_copy
    first = mlflow.pyfunc.load_model(str(path)).get_raw_model().variant.id
    assert first != "eager-fp32-cpu"
    victim = next(p for p in (path / "variants" / first).iterdir() if p.name != "variant.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="mlflow.chimera"):
        loaded = mlflow.pyfunc.load_model(str(path))
    raw = loaded.get_raw_model()
    assert raw.variant.id != first
    assert any(f"skipping variant {first}" in r.getMessage() and "sha256" in r.getMessage()
               for r in caplog.records)
    assert f"skipped {first}: failed to load: IntegrityError" in raw.explain()
    x = models.examples(batch=4, seed=7)["cnn"]
    tol = 0.15 if raw.variant.precision == "int8" else 1e-4
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(model, x)[0], atol=tol)


def test_tampered_variant_json_is_refused(local_copy):
    path, _, _ = local_copy
    vjson = path / "variants" / "onnxruntime-fp32-cpu" / "variant.json"
    vjson.write_text(vjson.read_text().replace('"ready"', '"ready" '))
    with pytest.raises(IntegrityError, match="variant.json"):
        mlflow.pyfunc.load_model(str(path))


def test_reference_program_with_wrong_digest_is_not_loaded(local_copy):
    path, _, _ = local_copy
    program = path / "reference" / "program.pt2"
    with pytest.raises(IntegrityError, match="expected"):
        load_program(program, "0" * 64)
    load_program(program, sha256_file(program))  # the recorded digest loads


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/chimera-pwned",))


def test_archive_with_a_malicious_pickle_is_refused(local_copy, tmp_path):
    path, _, _ = local_copy
    good = path / "reference" / "program.pt2"
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
