"""Loaders racing on one empty cache: separate processes load the same ``models:/`` URI at the
same moment into one empty ``CHIMERA_CACHE_DIR``, half forcing the ONNX Runtime variant (a
cached variant directory) and half the eager one (the cached reference program). Every round
must give no errors, only right answers, cache entries whose files match their digests, and no
temporary leftovers. Issue #17 measured 10 rounds × 4 processes; this test keeps that figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

import models
import servers
from mlflow_chimera.manifest import Variant, sha256_file

ROUNDS, PROCESSES = 10, 4
BACKENDS = ("onnxruntime", "eager")  # alternately, so both kinds of cache entry race

LOADER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import mlflow
    uri, backend, start_at, x_path, out_path = sys.argv[1:6]
    while time.time() < float(start_at):
        time.sleep(0.005)
    model = mlflow.pyfunc.load_model(uri, model_config={"backend": backend})
    got = model.predict(np.load(x_path))
    raw = model.get_raw_model()
    json.dump({"variant": raw.variant.id, "prediction": got.tolist()}, open(out_path, "w"))
""")


@pytest.mark.slow
def test_processes_racing_on_one_empty_cache_lose_nothing_and_leave_nothing(logged, tracking_uri, tmp_path):
    _, model, _, name = logged.get("mlp")
    uri = f"models:/{name}/1"
    x = models.examples(batch=3, seed=11)["mlp"]
    expected = models.eager_outputs(model, x)[0]
    x_path = tmp_path / "x.npy"
    np.save(x_path, x)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    records = [Variant.load(d) for d in (local / "variants").iterdir()]
    payloads = {v.content_key(): v.files for v in records if v.files}
    failures, wrong = [], []
    for round_no in range(ROUNDS):
        cache = tmp_path / f"cache-{round_no}"
        cache.mkdir()
        env = servers.venv_env({"MLFLOW_TRACKING_URI": tracking_uri, "CHIMERA_CACHE_DIR": str(cache)})
        start_at = time.time() + 3.0  # every process past its imports before any loads
        procs = []
        for i in range(PROCESSES):
            out = tmp_path / f"out-{round_no}-{i}.json"
            cmd = [sys.executable, "-c", LOADER, uri, BACKENDS[i % 2], str(start_at), str(x_path), str(out)]
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True), out, BACKENDS[i % 2]))
        for proc, out, backend in procs:
            log, _ = proc.communicate(timeout=300)
            if proc.returncode:
                failures.append(f"round {round_no} ({backend}): exit {proc.returncode}: {log[-1500:]}")
                continue
            answer = json.loads(out.read_text())
            if not answer["variant"].startswith(backend):
                wrong.append(f"round {round_no}: asked for {backend}, loaded {answer['variant']}")
            if not np.allclose(np.asarray(answer["prediction"]), expected, atol=1e-4):
                wrong.append(f"round {round_no} ({backend}): wrong answer")
        _check_cache(cache, round_no, payloads)
    assert not failures, "\n".join(failures)
    assert not wrong, "\n".join(wrong)


def _check_cache(cache: Path, round_no: int, payloads: dict) -> None:
    """Every variant entry holds exactly the files its record lists ({cache key: {path:
    sha256}}), with those digests; every reference program matches the digest it is filed
    under; nothing half-written is left."""
    leftovers = [str(p.relative_to(cache)) for p in cache.rglob("*")
                 if p.name.startswith((".fetch-", ".probe-")) or p.name.endswith((".tmp", ".old"))]
    assert not leftovers, f"round {round_no}: temporary leftovers {leftovers}"
    variants = [p for p in (cache / "variants").iterdir()] if (cache / "variants").is_dir() else []
    references = list((cache / "reference").glob("*/*")) if (cache / "reference").is_dir() else []
    assert variants and references, f"round {round_no}: expected both kinds of entry, got {sorted(cache.rglob('*'))}"
    for entry in variants:
        files = payloads.get(entry.name)
        assert files is not None, f"round {round_no}: cache entry {entry.name} is no variant's"
        present = {str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()}
        assert present == set(files), f"round {round_no}: {entry.name} holds {sorted(present)}"
        for rel, digest in files.items():
            assert sha256_file(entry / rel) == digest, f"round {round_no}: {entry.name}/{rel} corrupted"
    for program in references:
        assert sha256_file(program) == program.parent.name, f"round {round_no}: reference {program} corrupted"
