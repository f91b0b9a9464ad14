"""Build isolation: a compiler that crashes, hangs or raises fails only its own variant."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

import models


@pytest.mark.slow  # ~25 s: waits out a build timeout
def test_crash_and_hang_fail_only_their_own_variants(tracking_uri):
    model = models.mlp()
    info = mlflow.chimera.log_model(
        model, name="faulty", input_example=models.examples()["mlp"], precisions=["fp32"],
        backends=["faulty_backends:Crashing", "faulty_backends:Hanging", "faulty_backends:Raising",
                  "onnxruntime"],
        build_timeout=20,
    )
    variants = info.flavors["chimera"]["variants"]
    crashed, hung, raised = variants["crashing-fp32-cpu"], variants["hanging-fp32-cpu"], variants["raising-fp32-cpu"]
    assert crashed["status"] == hung["status"] == raised["status"] == "build_failed"
    assert "killed by signal SIGSEGV" in crashed["reason"] and "about to crash" in crashed["reason"]
    assert "timed out after 20 s" in hung["reason"]
    assert "unsupported operator aten::frobnicate" in raised["reason"]
    assert crashed["files"] == {}  # the half-written file did not survive
    assert variants["onnxruntime-fp32-cpu"]["status"] == "ready"

    local = mlflow.artifacts.download_artifacts(info.model_uri)
    from mlflow_chimera.manifest import Variant

    record = Variant.load(f"{local}/variants/hanging-fp32-cpu")
    assert record.provenance["isolation"]["outcome"].startswith("timed out")
    assert record.provenance["isolation"]["wall_seconds"] >= 20
    assert "thinking forever" in record.provenance["isolation"]["output_tail"]

    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.get_raw_model().variant.id.startswith("onnxruntime-fp32")
    assert "crashing-fp32-cpu: build failed: build process killed by signal SIGSEGV" in loaded.get_raw_model().explain()
    x = models.examples(batch=3)["mlp"]
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(model, x)[0], atol=1e-4)


@pytest.mark.slow  # logs the same model twice
def test_parallel_builds_give_the_same_variants(tracking_uri):
    info = mlflow.chimera.log_model(models.mlp(), name="parallel", input_example=models.examples()["mlp"],
                                    precisions=["fp32", "int8"], backends=["onnxruntime", "eager"],
                                    build_parallelism=2)
    variants = info.flavors["chimera"]["variants"]
    assert set(variants) == {"onnxruntime-fp32-cpu", "onnxruntime-fp32-cpu-noopt", "onnxruntime-int8-cpu",
                             "eager-fp32-cpu"}
    assert all(v["status"] == "ready" for v in variants.values())


def test_preloading_the_program_in_the_build_server_starts_no_threads_its_children_would_inherit(tmp_path):
    """The build server loads the reference program once and forks a child per variant; a
    thread pool started before the fork (OpenMP's, on the first op run) would be missing in the
    children and can hang them. Loading must create the program, never run it."""
    import subprocess
    import sys
    import textwrap

    import torch

    from mlflow_chimera.manifest import sha256_file

    path = tmp_path / "program.pt2"  # large enough that running it uses the thread pool
    torch.export.save(torch.export.export(torch.nn.Linear(2048, 2048).eval(), (torch.randn(2, 2048),)), str(path))
    code = textwrap.dedent(f"""
        import os, torch
        from mlflow_chimera.compile import worker
        torch.set_num_threads(2)
        before = len(os.listdir("/proc/self/task"))
        worker.preload_program({str(path)!r}, {sha256_file(path)!r})
        after = len(os.listdir("/proc/self/task"))
        worker.preloaded_program({str(path)!r}, {sha256_file(path)!r}).module()(torch.randn(2, 2048))
        print(before, after, len(os.listdir("/proc/self/task")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, ran = map(int, out.stdout.split()[-3:])
    assert after == before, f"preloading started {after - before} thread(s)"
    assert ran > before  # running it does start the pool: the check above can tell
