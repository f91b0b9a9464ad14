"""Logging one model three ways into one tracking store, as a user of each flavor would.

* ``mlflow.chimera.log_model(model, name, input_example=x, registered_model_name=…)`` with its
  defaults (every backend this host can build, fp32 and int8); quick mode only shortens its
  log-time benchmark.
* ``mlflow.pytorch.log_model(model, name, input_example=x, serialization_format="pt2", …)``:
  ``pt2`` (``torch.export``) is what a security-minded user picks (MLflow loads it without
  unpickling arbitrary objects); ``"pickle"`` can run arbitrary code on load.
* ``mlflow.onnx.log_model(onnx_model, name, input_example=x, …)`` after the user exports the
  model themselves with ``torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=…)`` (a
  dynamic batch dimension), MLflow's defaults otherwise. Note that MLflow's ONNX pyfunc asks for
  the CUDA execution provider first by default and only warns when it is missing; it then runs
  with ONNX Runtime's default CPU session options.

Every model is registered, and everything later loads it by ``models:/<name>/<version>``.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

FLAVORS = ("chimera", "pytorch", "onnx")
# Column/row labels.
LABELS = {"chimera": "mlflow.chimera", "pytorch": "mlflow.pytorch (pt2)", "onnx": "mlflow.onnx"}


def setup_tracking(root: Path) -> str:
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    experiment_id = mlflow.create_experiment("chimera-benchmarks", artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri


def _uri(name: str, info) -> str:
    return f"models:/{name}/{info.registered_model_version}"


def log_chimera(spec, example, tag: str, chimera_benchmark: dict | None, backends=None) -> dict:
    import mlflow
    import mlflow.chimera  # noqa: F401  (registers the flavor alias)

    name = f"{tag}-chimera"
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=name):
        info = mlflow.chimera.log_model(spec.module, name=name, input_example=example,
                                        registered_model_name=name, backends=backends,
                                        **({"benchmark": chimera_benchmark} if chimera_benchmark else {}))
    return {"uri": _uri(name, info), "log_seconds": round(time.perf_counter() - t0, 2),
            "log_time_benchmark": chimera_benchmark or "default",
            "backends": backends or "default (every backend this host can build)"}


def log_pytorch(spec, example, tag: str) -> dict:
    import mlflow
    import mlflow.pytorch

    supports_pt2 = "serialization_format" in inspect.signature(mlflow.pytorch.log_model).parameters
    name = f"{tag}-pytorch"
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=name):
        info = mlflow.pytorch.log_model(spec.module, name=name, input_example=example,
                                        registered_model_name=name,
                                        **({"serialization_format": "pt2"} if supports_pt2 else {}))
    return {"uri": _uri(name, info), "log_seconds": round(time.perf_counter() - t0, 2),
            "serialization_format": "pt2" if supports_pt2 else "default (pickle)",
            # torch.export (pt2) specialises a batch of 1 to a constant; the example has batch >= 2
            "example_batch": int(example.shape[0])}


def export_onnx(spec, example):
    """What a user does: torch.onnx.export with the dynamo exporter and a dynamic batch."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(spec.module, (torch.from_numpy(example),), dynamo=True, verbose=False,
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: batch},))
    return program.model_proto


def log_onnx(spec, example, tag: str) -> dict:
    import mlflow
    import mlflow.onnx

    t0 = time.perf_counter()
    proto = export_onnx(spec, example)
    export_seconds = time.perf_counter() - t0
    name = f"{tag}-onnx"
    t1 = time.perf_counter()
    with mlflow.start_run(run_name=name):
        info = mlflow.onnx.log_model(proto, name=name, input_example=example, registered_model_name=name)
    return {"uri": _uri(name, info), "log_seconds": round(time.perf_counter() - t1, 2),
            "export_seconds": round(export_seconds, 2),
            "exporter": "torch.onnx.export(dynamo=True, dynamic batch)",
            "execution_providers": "MLflow default (CUDA first, CPU fallback with a warning)"}


def log_all(spec, tag: str, chimera_benchmark: dict | None, chimera_backends=None) -> dict:
    example = spec.example()
    return {"chimera": log_chimera(spec, example, tag, chimera_benchmark, chimera_backends),
            "pytorch": log_pytorch(spec, example, tag),
            "onnx": log_onnx(spec, example, tag)}


# Where in-process loads put their artifacts (set by the runner to a directory it removes).
LOAD_ROOT: str | None = None


def load(uri: str, model_config: dict | None = None):
    """(pyfunc model, seconds). Artifacts go to a fresh temporary directory, as a user's would."""
    import mlflow

    dst = tempfile.mkdtemp(prefix="load-", dir=LOAD_ROOT)
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri, dst_path=dst, model_config=model_config)
    return model, round(time.perf_counter() - t0, 3)
