"""Cold start: a fresh ``python -c`` process that imports MLflow, loads the model by its
``models:/`` URI from the sqlite store, and predicts once on a batch-1 input.

Measured from just before the process is spawned to just after the first prediction returns
(wall clock, the same clock in parent and child), median of several; the child reports its
phases (interpreter start, ``import mlflow``, ``load_model``, first ``predict``), its peak RSS
(``VmHWM``) and whether torch / onnxruntime ended up in ``sys.modules``. The flavors'
spawns are interleaved round by round, after one untimed spawn each (warm page cache).

Floors, measured the same way in the same rounds: ``python`` (an interpreter that imports
numpy and exits), ``import_mlflow`` (``import mlflow``), and ``resolve_uri`` (``import mlflow``
plus MLflow resolving and downloading the ``mlflow.onnx`` model's ``models:/`` URI — what any
flavor pays before its own loader runs).

chimera is loaded with its default configuration (the pick a user gets) and, separately, with
``model_config={"precision": "fp32"}`` where that picks a different variant, and with
``model_config={"backend": "onnxruntime"}`` where the default pick is not an ONNX Runtime
variant (the cold-start target is about an ONNX Runtime pick).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.common import QUIET_ENV, BackgroundLoad

CHILD = textwrap.dedent("""
    import time
    t_start = time.time()
    import json, resource, sys
    import numpy as np
    kind, uri, config, x_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    out = {"t_start": t_start}
    if kind != "python":
        import mlflow
        out["t_import"] = time.time()
        if kind == "resolve_uri":
            from mlflow.tracking.artifact_utils import _download_artifact_from_uri
            _download_artifact_from_uri(uri)
            out["t_loaded"] = out["t_done"] = time.time()
        elif kind == "model":
            m = mlflow.pyfunc.load_model(uri, model_config=config or None)
            out["t_loaded"] = time.time()
            y = m.predict(np.load(x_path))
            out["t_done"] = time.time()
            raw = m.get_raw_model()
            variant = getattr(raw, "variant", None)
            if variant is not None:
                out["variant"] = variant.id
        else:
            out["t_done"] = time.time()
    else:
        out["t_done"] = time.time()
    # Peak RSS of this process image: VmHWM (ru_maxrss would also count the parent's memory,
    # which a vfork/exec child inherits as its high-water mark).
    with open("/proc/self/status") as f:
        hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
    out["maxrss_kb"] = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["torch_imported"] = "torch" in sys.modules
    out["onnxruntime_imported"] = "onnxruntime" in sys.modules
    print("COLDSTART " + json.dumps(out))
""")


def _env(tracking_uri: str) -> dict:
    env = dict(os.environ)
    for key in ("SERVING_MODEL_CONFIG", "MLFLOW_PYFUNC_INFERENCE_CONFIG", "PYTHONPATH"):
        env.pop(key, None)
    env.update(QUIET_ENV)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["MLFLOW_REGISTRY_URI"] = tracking_uri
    return env


def spawn(kind: str, uri: str, config: dict | None, x_path: Path, env: dict, cwd: Path,
          timeout: float = 300) -> dict:
    t_spawn = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, uri, json.dumps(config or {}), str(x_path)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    t_exit = time.time()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLDSTART ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"cold-start child ({kind} {uri}) exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    d = json.loads(lines[-1][len("COLDSTART "):])
    r = {"seconds": d["t_done"] - t_spawn,
         "interpreter_s": d["t_start"] - t_spawn,
         "process_exit_s": t_exit - t_spawn,
         "peak_rss_mb": d["maxrss_kb"] / 1024.0,
         "torch_imported": d["torch_imported"],
         "onnxruntime_imported": d["onnxruntime_imported"]}
    if "t_import" in d:
        r["import_mlflow_s"] = d["t_import"] - d["t_start"]
    if "t_loaded" in d:
        r["load_s"] = d["t_loaded"] - d.get("t_import", d["t_start"])
        r["first_predict_s"] = d["t_done"] - d["t_loaded"]
    if "variant" in d:
        r["variant"] = d["variant"]
    return r


def measure(spec, logged: dict, chimera_configs: dict, tracking_uri: str, workdir: Path,
            rounds: int, model_independent_floors: bool = True, warmup: bool = True) -> dict:
    """``chimera_configs``: extra chimera loads to time besides the default, {label: model_config}
    (e.g. ``chimera_fp32``: ``{"precision": "fp32"}``, ``chimera_ort``: ``{"backend": "onnxruntime"}``)."""
    """Interleaved fresh-process cold starts of every flavor (and the floors) for one model."""
    import numpy as np

    workdir.mkdir(parents=True, exist_ok=True)
    x_path = workdir / f"{spec.name}-x1.npy"
    np.save(x_path, spec.make_input(1, 3))
    env = _env(tracking_uri)
    kinds = {"chimera": ("model", logged["chimera"]["uri"], None)}
    for label, config in chimera_configs.items():
        kinds[label] = ("model", logged["chimera"]["uri"], config)
    kinds["pytorch"] = ("model", logged["pytorch"]["uri"], None)
    kinds["onnx"] = ("model", logged["onnx"]["uri"], None)
    if model_independent_floors:
        kinds["floor_python"] = ("python", "", None)
        kinds["floor_import_mlflow"] = ("import_mlflow", "", None)
    kinds["floor_resolve_uri"] = ("resolve_uri", logged["onnx"]["uri"], None)
    names = list(kinds)
    samples = {n: [] for n in names}
    with BackgroundLoad() as background:
        for n in names if warmup else ():  # untimed: warm the page cache
            spawn(*kinds[n], x_path, env, workdir)
        for r in range(rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            if r % 2:
                order.reverse()
            for n in order:
                samples[n].append(spawn(*kinds[n], x_path, env, workdir))
    out = {"rounds": rounds, "warmup_spawns": warmup, "background_cpu_cores": background.cores, "flavors": {}}
    for n, runs in samples.items():
        entry = {"median_s": statistics.median(r["seconds"] for r in runs),
                 "samples_s": [round(r["seconds"], 4) for r in runs],
                 "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                 "torch_imported": any(r["torch_imported"] for r in runs),
                 "onnxruntime_imported": any(r["onnxruntime_imported"] for r in runs)}
        for phase in ("interpreter_s", "import_mlflow_s", "load_s", "first_predict_s"):
            if phase in runs[0]:
                entry[phase] = statistics.median(r[phase] for r in runs)
        variants = sorted({r["variant"] for r in runs if "variant" in r})
        if variants:
            entry["variant"] = variants[0] if len(variants) == 1 else variants
        out["flavors"][n] = entry
    f = out["flavors"]
    out["chimera_configs"] = chimera_configs
    out["chimera_minus_onnx_s"] = f["chimera"]["median_s"] - f["onnx"]["median_s"]
    # The target compares an ONNX Runtime pick with mlflow.onnx: the default pick when it is one.
    ort = next((k for k in ("chimera", "chimera_ort", "chimera_fp32")
                if k in f and str(f[k].get("variant", "")).startswith("onnxruntime")), None)
    out["chimera_ort_flavor"] = ort
    if ort:
        out["chimera_ort_minus_onnx_s"] = f[ort]["median_s"] - f["onnx"]["median_s"]
    out["pytorch_over_chimera"] = f["pytorch"]["median_s"] / f["chimera"]["median_s"]
    return out
