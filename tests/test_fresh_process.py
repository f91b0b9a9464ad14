"""What a fresh interpreter sees: serving an ONNX Runtime variant without torch, the
``mlflow.chimera`` alias, and a cheap ``import mlflow_chimera``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import models

HEAVY = ("torch", "onnxruntime", "mlflow.models")


def _run_fresh(code: str, cwd, env_extra: dict | None = None, timeout: int = 180) -> dict:
    """Run ``code`` in a new interpreter (outside the repo, so the installed package is used);
    it prints one JSON object as its last line of stdout."""
    env = dict(os.environ)
    for key in ("SERVING_MODEL_CONFIG", "MLFLOW_PYFUNC_INFERENCE_CONFIG", "PYTHONPATH"):
        env.pop(key, None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output\nstderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def _loaded(modules: list, prefix: str) -> list:
    return [m for m in modules if m == prefix or m.startswith(prefix + ".")]


def test_onnxruntime_variant_serves_without_importing_torch(logged, tracking_uri, tmp_path):
    import mlflow

    info, torch_model, example, name = logged.get("mlp")
    x = models.examples(batch=3, seed=11)["mlp"]
    np.save(tmp_path / "x.npy", x)
    result = _run_fresh(
        f"""
        import json, sys
        import numpy as np
        import mlflow
        m = mlflow.pyfunc.load_model("models:/{name}/1", model_config={{"backend": "onnxruntime"}})
        y = m.predict(np.load("x.npy"))
        print(json.dumps({{
            "variant": m.get_raw_model().variant.id,
            "prediction": np.asarray(y).tolist(),
            "torch_loaded": "torch" in sys.modules,
            "torch_modules": sorted(k for k in sys.modules if k == "torch" or k.startswith("torch.")),
            "onnxruntime_loaded": "onnxruntime" in sys.modules,
        }}))
        """,
        cwd=tmp_path,
        env_extra={"MLFLOW_TRACKING_URI": tracking_uri},
    )
    assert result["variant"].startswith("onnxruntime"), result["variant"]
    assert result["torch_loaded"] is False, result["torch_modules"]
    assert result["torch_modules"] == []
    assert result["onnxruntime_loaded"] is True

    got = np.asarray(result["prediction"], dtype=np.float32)
    local = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"backend": "onnxruntime"})
    assert local.get_raw_model().variant.id == result["variant"]
    np.testing.assert_allclose(got, local.predict(x), rtol=0, atol=1e-5)
    (eager,) = models.eager_outputs(torch_model, x)
    np.testing.assert_allclose(got, eager, rtol=0, atol=0.1)  # int8 may be the fastest


def test_import_mlflow_dot_chimera_in_a_fresh_interpreter(tmp_path):
    result = _run_fresh(
        """
        import json
        import mlflow.chimera
        import mlflow_chimera
        import mlflow_chimera.flavor
        print(json.dumps({
            "same_package": mlflow.chimera is mlflow_chimera,
            "log_model_callable": callable(mlflow.chimera.log_model),
            "log_model_is_flavors": mlflow.chimera.log_model is mlflow_chimera.flavor.log_model,
            "flavor_name": mlflow.chimera.FLAVOR_NAME,
        }))
        """,
        cwd=tmp_path,
    )
    assert result == {"same_package": True, "log_model_callable": True,
                      "log_model_is_flavors": True, "flavor_name": "chimera"}


def test_from_mlflow_import_chimera_in_a_fresh_interpreter(tmp_path):
    result = _run_fresh(
        """
        import json, sys
        from mlflow import chimera
        print(json.dumps({
            "module": chimera.__name__,
            "is_alias": sys.modules.get("mlflow.chimera") is chimera,
            "has_log_model": callable(chimera.log_model),
        }))
        """,
        cwd=tmp_path,
    )
    assert result == {"module": "mlflow_chimera", "is_alias": True, "has_log_model": True}


def test_import_mlflow_chimera_alone_is_light(tmp_path):
    result = _run_fresh(
        """
        import json, sys
        import mlflow_chimera
        print(json.dumps({"modules": sorted(sys.modules), "file": mlflow_chimera.__file__}))
        """,
        cwd=tmp_path,
    )
    heavy = {prefix: _loaded(result["modules"], prefix) for prefix in HEAVY}
    assert heavy == {prefix: [] for prefix in HEAVY}, heavy
    assert result["file"].endswith(os.path.join("mlflow_chimera", "__init__.py"))
