"""Helpers for fleet tests: run a step "on another host" — a separate Python process with its
own chimera cache directory, talking to the same tracking store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS_DIR = str(Path(__file__).parent)


def run_as_host(code: str, tracking_uri: str, cache_dir, extra_env: dict | None = None,
                timeout: float = 600) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line last. Returns it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "CHIMERA_CACHE_DIR": str(cache_dir),
                "PYTHONPATH": os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")])})
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"host process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COMPILE = """
import json, sys
from mlflow_chimera.publish import compile_model
result = compile_model({uri!r}, backends={backends!r}, precisions={precisions!r}, benchmark={{"max_seconds": 0.2}})
print(json.dumps(result))
"""

LOAD_AND_PREDICT = """
import json, sys
import numpy as np, mlflow
import models
model = mlflow.pyfunc.load_model({uri!r})
raw = model.get_raw_model()
x = models.examples(batch=3, seed=11)[{kind!r}]
pred = model.predict(x)
print(json.dumps({{"variant": raw.variant.id, "explain": raw.explain(),
                  "pred": np.asarray(pred).tolist(), "torch_imported": "torch" in sys.modules}}))
"""


def cached_files(cache_dir) -> set:
    """Names of the payload files in a chimera cache (variant records, their signatures,
    remembered anchors and remembered model directories aside)."""
    root = Path(cache_dir)
    remembered = root / "models"
    return {p.name for p in root.rglob("*")
            if p.is_file() and p.name not in ("variant.json", "variant.sig") and p.parent.name != "anchors"
            and not p.is_relative_to(remembered)}


def assert_fastest_or_tied(chosen: str, explanation: str, p50s: dict) -> str:
    """The loader chose the fastest of ``p50s`` ({variant id: p50}), or a variant that ties
    with it within the measurement noise and says so in ``explain()``. Returns the fastest."""
    fastest = min(p50s, key=p50s.get)
    if chosen != fastest:
        assert f"ties with {fastest}" in explanation, explanation
    return fastest
