"""Benchmark the variants of an already-logged model on *this* host, and store the result for
this host's class, so a serving host of a class nobody measured can rank by its own figures.

    import mlflow_chimera
    mlflow_chimera.benchmark("models:/clf/1")

Results go to ``benchmarks/<host class>.json`` in the model's artifacts (the logged model's,
for a tracking-store URI; the directory itself, for a local path). When the model is loaded,
those figures join the ones recorded at log time, and selection ranks by the ones measured on
the loading host's class — for a logged model, only while the file matches the digest stored
beside it in the tracking store (``chimera.benchmark_sha256.<host class>``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from mlflow_chimera import FLAVOR_NAME
from mlflow_chimera.manifest import BENCHMARKS_DIR, read_mlmodel


def benchmark_file(model_dir, host_class: str) -> Path:
    return Path(model_dir, BENCHMARKS_DIR, f"{host_class}.json")


def benchmark(model_uri: str, batches=None, timing: dict | None = None, store: bool = True) -> dict:
    """Time every variant that passed parity and can run here, on this host.

    Args:
        model_uri: ``models:/…``, ``runs:/…`` or a local model directory.
        batches: batch sizes to time (default: 1 and the batch of the logged example).
        timing: timing options (``compile.timing.TimingConfig`` fields).
        store: write the result for this host class into the model's artifacts.

    Returns ``{"host_class": …, "variants": {id: {"latency_ms": {batch: {p50, p90, p99, …}}}},
    "skipped": {id: reason}}``.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="chimera-bench-") as tmp:
        local = model_uri if os.path.isdir(model_uri) else \
            mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        return _benchmark_local(model_uri, local, batches, timing, store)


def _benchmark_local(model_uri: str, local: str, batches, timing, store: bool) -> dict:
    import numpy as np
    from mlflow.utils.model_utils import _get_flavor_configuration

    from mlflow_chimera import host as host_mod
    from mlflow_chimera import runtime
    from mlflow_chimera.compile.parity import make_inputs
    from mlflow_chimera.compile.timing import TimingConfig, measure_interleaved, pin_threads
    from mlflow_chimera.manifest import CHECK_INPUTS
    from mlflow_chimera.selection import rank

    from mlflow_chimera.trust import Source

    conf = _get_flavor_configuration(model_path=local, flavor_name=FLAVOR_NAME)
    variants, context = runtime.read_variants(local, conf, source=Source(None if os.path.isdir(model_uri) else model_uri))
    host = host_mod.fingerprint()
    decision = rank(variants, host, {"precision": "any"})  # time every ready variant, lossy ones too
    with np.load(Path(local, CHECK_INPUTS), allow_pickle=False) as data:
        example = {k: data[k] for k in data.files}
    example_batch = next(iter(example.values())).shape[0]
    inputs = {b: make_inputs(example, b) for b in sorted(set(batches or (1, example_batch)))}
    config = TimingConfig.from_options(timing)
    result = {"host_class": host.host_class, "host": host.to_dict(),
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "timing": dataclasses.asdict(config), "method": "interleaved",
              "variants": {}, "skipped": dict(decision.rejected)}
    calls = {}
    for candidate in decision.candidates:
        variant = candidate.variant
        try:
            runner = runtime.load_verified(variant, Path(local), context, check=True)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot load here is reported
            result["skipped"][variant.id] = f"failed to load: {type(exc).__name__}: {exc}"
            continue
        for b, x in inputs.items():
            calls[(variant.id, str(b))] = lambda run=runner.run, x=x: run(x)
    result["threads"] = pin_threads()  # after loading: torch is imported only by torch variants
    # Timed side by side, as at log time (compile/timing.py), so the figures compare fairly.
    for (vid, batch), figures in measure_interleaved(calls, config).items() if calls else ():
        result["variants"].setdefault(vid, {"latency_ms": {}})["latency_ms"][batch] = figures
    if store:
        _store(result, model_uri, local)
    return result


def _store(result: dict, model_uri: str, local: str) -> None:
    """Write the result into a local model directory, or upload it to the logged model."""
    if os.path.isdir(model_uri):
        path = benchmark_file(model_uri, result["host_class"])
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        return
    from mlflow.tracking import MlflowClient

    model_id = read_mlmodel(local).get("model_id")
    if not model_id:
        raise ValueError(f"{model_uri} has no logged model id; benchmark a local copy instead")
    from mlflow_chimera.manifest import sha256_file
    from mlflow_chimera.trust import BENCHMARK_ANCHOR_PREFIX

    with tempfile.TemporaryDirectory() as tmp:
        path = benchmark_file(tmp, result["host_class"])
        path.parent.mkdir()
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        client = MlflowClient()
        client.log_model_artifact(model_id, str(path), artifact_path=BENCHMARKS_DIR)
        # The digest in the tracking store is what lets these figures steer ranking (trust.py).
        client.set_logged_model_tags(model_id, {BENCHMARK_ANCHOR_PREFIX + result["host_class"]: sha256_file(path)})
