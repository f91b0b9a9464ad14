"""Batch scoring on Spark: rows/s of ``mlflow.pyfunc.spark_udf`` for the chimera model and the
``mlflow.pytorch`` one, on the same local Spark (``local[2]``, JVM on 127.0.0.1, no UI), over
the same cached DataFrame, in interleaved rounds (the order alternates).

Each input row is one example, flattened into an ``array<float>`` column; spark_udf reshapes it
to the signature's shape. A round scores every row and sums the output sizes on the driver, so
every row is scored. The first pass of each flavor (its Python workers loading the model, the
chimera executors fetching their variant) is not timed. The two flavors' outputs are compared
on the first rows.

Runs in a child process (``python -m benchmarks.spark CONFIG.json``) so that the JVM and its
workers end with it. Needs ``pyspark`` and Java 17+; without them the phase is recorded as
skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1200
FLAVORS = ("chimera", "pytorch")
COMPARE_ROWS = 16


def unavailable() -> str | None:
    """Why Spark cannot run here, or None."""
    if shutil.which("java") is None:
        return "no `java` on PATH (Spark needs Java 17 or newer)"
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (it comes with the test extra)"
    return None


def measure(spec, logged: dict, tracking_uri: str, *, rows: int, rounds: int, workdir: Path) -> dict:
    """Score ``rows`` examples of ``spec`` through each flavor's spark_udf, ``rounds`` times."""
    why = unavailable()
    if why:
        return {"skipped": why}
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"model": spec.name, "uris": {f: logged[f]["uri"] for f in FLAVORS}, "rows": rows,
              "rounds": rounds, "workdir": str(workdir)}
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_REGISTRY_URI=tracking_uri,
               SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TMPDIR=str(workdir),
               CHIMERA_CACHE_DIR=str(workdir / "chimera-cache"))
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.spark", str(config_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"spark child exited {done.returncode}: {(done.stderr or done.stdout)[-3000:]}")
    return json.loads(lines[-1])


def _session(workdir: Path):
    from pyspark.sql import SparkSession

    for sub in ("local", "warehouse"):
        (workdir / sub).mkdir(exist_ok=True)
    return (SparkSession.builder.master("local[2]").appName("chimera-spark-benchmark")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
            .config("spark.local.dir", str(workdir / "local"))
            .config("spark.sql.warehouse.dir", str(workdir / "warehouse"))
            .config("spark.sql.catalogImplementation", "in-memory")
            .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={workdir}")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate())


def _child(config_path: str) -> dict:
    import mlflow
    import numpy as np
    import pandas as pd
    from pyspark.sql import functions as F

    from benchmarks.models import build

    config = json.loads(Path(config_path).read_text())
    workdir = Path(config["workdir"])
    tempfile.tempdir = str(workdir)
    spec = build(config["model"])
    x = spec.make_input(config["rows"], 7).astype(np.float32)
    spark = _session(workdir)
    try:
        frame = pd.DataFrame({"i": np.arange(len(x)), "x": list(x.reshape(len(x), -1))})
        df = spark.createDataFrame(frame).repartition(2).cache()
        df.count()
        udfs = {f: mlflow.pyfunc.spark_udf(spark, config["uris"][f], result_type="array<float>",
                                           env_manager="local") for f in FLAVORS}
        firsts = {}
        for f in FLAVORS:  # untimed: workers load the model (chimera executors fetch their variant)
            head = df.where(F.col("i") < COMPARE_ROWS).orderBy("i").select(udfs[f]("x").alias("y")).collect()
            firsts[f] = np.asarray([r["y"] for r in head], dtype=np.float64)
            df.select(F.sum(F.size(udfs[f]("x")))).collect()
        seconds = {f: [] for f in FLAVORS}
        for r in range(config["rounds"]):
            for f in (FLAVORS if r % 2 == 0 else FLAVORS[::-1]):
                t0 = time.perf_counter()
                total = df.select(F.sum(F.size(udfs[f]("x")))).collect()[0][0]
                seconds[f].append(time.perf_counter() - t0)
                if not total:
                    raise RuntimeError(f"{f}: spark_udf scored nothing")
        rows_per_s = {f: config["rows"] / float(np.median(s)) for f, s in seconds.items()}
        return {"rows": config["rows"], "rounds": config["rounds"], "partitions": 2, "master": "local[2]",
                "rows_per_s": rows_per_s, "seconds": seconds,
                "speedup_vs_pytorch": rows_per_s["chimera"] / rows_per_s["pytorch"],
                "max_abs_diff_chimera_vs_pytorch": float(np.max(np.abs(firsts["chimera"] - firsts["pytorch"])))}
    finally:
        spark.stop()


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])), flush=True)
