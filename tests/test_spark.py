"""Batch scoring on Spark: ``mlflow.pyfunc.spark_udf(spark, "models:/…", result_type=…,
env_manager="local")`` on a real local Spark (``local[2]``, JVM bound to 127.0.0.1, no UI).

spark_udf downloads the small model directory (MLmodel, variant records, check files) on the
driver; each task in a Python worker then loads that copy with ``mlflow.pyfunc.load_model``, so
chimera's selection runs on the executor, and the executor fetches only the variant it picks
from the run's artifacts into its own cache (``CHIMERA_CACHE_DIR``). The tests check the
predictions against the same model loaded on the driver, the executor's
"chimera: loaded variant <id>" log line, that the executor's load was checked against the
model's anchor (the URI the UDF was made for, not "a local directory"), and what it fetched.

Needs Java 17+ (``.ci/run`` installs it): skipped without ``java``, except under ``CI``, where
it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import models

pytestmark = [pytest.mark.slow, pytest.mark.spark]

ROWS = 50
CLOSE = 1e-5  # executor vs the same model loaded on the driver (same host, same variant)
LOADED = re.compile(r"chimera: loaded variant (\S+) \(([^)]*)\)")


def _unavailable(reason: str):
    """Fail in CI (Java is part of what CI installs), skip elsewhere — with the reason."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the Spark tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


class LocalSpark:
    """A SparkSession and the file its JVM (and so every Python worker) writes stderr to."""

    def __init__(self, session, stderr_path: Path):
        self.session = session
        self.stderr_path = stderr_path

    def log_offset(self) -> int:
        return self.stderr_path.stat().st_size

    def loaded_since(self, offset: int, expected: int, timeout: float = 15.0) -> list:
        """(variant id, how trusted) of each "chimera: loaded variant" line the Python workers
        wrote after ``offset``; waits a little for at least ``expected`` of them (a worker's
        stderr reaches the file through a JVM thread, shortly after the task ends)."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                found = LOADED.findall(f.read())
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def stderr_tail(self, n: int = 4000) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-n:]


@pytest.fixture(scope="module")
def spark(tmp_path_factory, tracking_uri):
    """A local[2] Spark for this module, bound to 127.0.0.1, every directory it writes under
    pytest's tmp_path, stopped (JVM included) at the end.

    The executors' log lines: Spark pipes each Python worker's stderr into the JVM's stderr.
    ``capfd`` cannot see that (the JVM is another process and keeps the fd 2 it inherited at
    launch, which pytest swaps per test), and running the job in a subprocess would start a
    second JVM (~15 s). Instead the JVM is launched through pyspark's ``launch_gateway`` with
    ``popen_kwargs`` sending its stdout and stderr to a file we own, so every line a worker
    logs lands there, in order, for as long as the session lives."""
    if shutil.which("java") is None:
        _unavailable("no `java` on PATH (Spark needs Java 17 or newer: apt-get install openjdk-17-jre-headless)")
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is not None or SparkContext._gateway is not None:
        pytest.fail("a Spark JVM is already running in this process; this module starts its own", pytrace=False)
    root = tmp_path_factory.mktemp("spark")
    tmp, local_dirs, warehouse = root / "tmp", root / "local", root / "warehouse"
    for folder in (tmp, local_dirs):
        folder.mkdir()
    mp = pytest.MonkeyPatch()
    # Inherited by the JVM and, through it, by the Python workers.
    mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    mp.setenv("SPARK_LOCAL_DIRS", str(local_dirs))  # block manager, shuffle, pyspark temp files
    mp.setenv("PYSPARK_PYTHON", sys.executable)  # workers run in this venv (env_manager="local")
    mp.setenv("TMPDIR", str(tmp))
    mp.setenv("CHIMERA_CACHE_DIR", str(root / "driver-cache"))  # tests give executors their own
    mp.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    mp.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    # The driver's own temporary files (spark_udf's download of the model directory).
    mp.setattr(tempfile, "tempdir", str(tmp))
    conf = (SparkConf()
            .setMaster("local[2]")
            .setAppName("chimera-spark-udf-tests")
            .set("spark.driver.host", "127.0.0.1")
            .set("spark.driver.bindAddress", "127.0.0.1")
            .set("spark.ui.enabled", "false")
            .set("spark.ui.showConsoleProgress", "false")
            .set("spark.sql.warehouse.dir", str(warehouse))
            .set("spark.sql.catalogImplementation", "in-memory")
            .set("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={tmp}")
            .set("spark.sql.shuffle.partitions", "2"))
    stderr_path = root / "spark-jvm-stderr.log"
    log = open(stderr_path, "ab")
    gateway = sc = session = None
    try:
        gateway = launch_gateway(conf, popen_kwargs={"stdout": log, "stderr": log})
        sc = SparkContext(conf=conf, gateway=gateway)
        session = SparkSession(sc)
        yield LocalSpark(session, stderr_path)
    finally:
        try:
            if session is not None:
                session.stop()  # and its SparkContext
            elif sc is not None:
                sc.stop()
        finally:
            if gateway is not None:
                # SparkContext.stop leaves the JVM running until this process exits; it exits
                # as soon as its stdin closes.
                gateway.shutdown()
                proc = gateway.proc
                if proc is not None:
                    proc.stdin.close()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
            SparkContext._gateway = None
            SparkContext._jvm = None
            log.close()
            mp.undo()


def _executor_cache(tmp_path: Path) -> dict:
    """spark_udf's ``extra_env``: a fresh chimera cache for this test's executors, so what
    they fetched can be listed."""
    return {"CHIMERA_CACHE_DIR": str(tmp_path / "executor-cache")}


def _fetched(cache: Path) -> dict:
    """{kind: sorted entry names} of a chimera cache directory (variants/, reference/, …)."""
    return {kind.name: sorted(p.name for p in kind.iterdir()) for kind in sorted(cache.iterdir()) if kind.is_dir()}


# -- a: one input, one output -------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp(logged):
    info, torch_model, example, name = logged.get("mlp", backends=["onnxruntime"])
    return f"models:/{name}/1"


def test_single_input_model_scores_like_predict_and_the_executor_logs_its_pick(spark, mlp, tmp_path):
    import mlflow

    x = models.examples(batch=ROWS, seed=11)["mlp"]
    df = spark.session.createDataFrame([(i, row.tolist()) for i, row in enumerate(x)],
                                       "id int, x array<float>").repartition(3)
    assert df.rdd.getNumPartitions() >= 2
    extra_env = _executor_cache(tmp_path)
    offset = spark.log_offset()
    udf = mlflow.pyfunc.spark_udf(spark.session, mlp, result_type="array<float>",
                                  env_manager="local", extra_env=extra_env)
    rows = df.select("id", udf("x").alias("prediction")).collect()
    nonempty_partitions = sum(1 for n in df.rdd.glom().map(len).collect() if n)

    got = np.array([r.prediction for r in sorted(rows, key=lambda r: r.id)], dtype=np.float32)
    on_driver = mlflow.pyfunc.load_model(mlp)  # after the job: the executors' cache starts empty
    chosen = on_driver.get_raw_model().variant
    expected = on_driver.predict(x)
    assert got.shape == expected.shape == (ROWS, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=CLOSE)

    # c: every task loaded the model in its Python worker and said which variant it runs —
    # the one the driver picks on this same host — and checked it against the model's anchor
    # in the tracking store (the executor loads the driver's copy, but knows the models:/ URI).
    loaded = spark.loaded_since(offset, expected=nonempty_partitions)
    assert len(loaded) >= nonempty_partitions >= 2, spark.stderr_tail()
    assert {vid for vid, _ in loaded} == {chosen.id}, loaded
    assert all(how.startswith("anchored: ") for _, how in loaded), loaded

    # Executors fetched only the variant they chose (no other variant, no reference program).
    fetched = _fetched(Path(extra_env["CHIMERA_CACHE_DIR"]))
    assert fetched.get("variants") == [chosen.content_key()], fetched
    assert "reference" not in fetched, fetched


# -- b: two inputs, two outputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def two(logged):
    info, torch_model, example, name = logged.get("two_in_two_out", backends=["onnxruntime"])
    return f"models:/{name}/1"


@pytest.fixture(scope="module")
def two_rows(spark):
    batch = models.examples(batch=ROWS, seed=12)["two_in_two_out"]
    rows = [(i, f.tolist(), c.tolist()) for i, (f, c) in enumerate(zip(batch["features"], batch["context"]))]
    df = spark.session.createDataFrame(rows, "id int, features array<float>, context array<float>").repartition(2)
    return batch, df


# A model with several outputs returns a dict of arrays. spark_udf turns that into a pandas
# DataFrame with one column per output and keeps only the columns the result type can hold: a
# struct with one array field per output name works; a plain array<float> does not (MLflow
# finds no numeric column, since each cell holds an array, and fails the task).
TWO_RESULT = "score array<float>, embedding array<float>"


@pytest.mark.parametrize("call", ["columns", "struct", "signature"])
def test_two_input_model_scores_like_predict(spark, two, two_rows, call, tmp_path):
    import mlflow
    from pyspark.sql.functions import struct

    batch, df = two_rows
    extra_env = _executor_cache(tmp_path)
    offset = spark.log_offset()
    udf = mlflow.pyfunc.spark_udf(spark.session, two, result_type=TWO_RESULT, env_manager="local",
                                  extra_env=extra_env)
    column = {
        "columns": lambda: udf("features", "context"),  # one array column per input, in signature order
        "struct": lambda: udf(struct("context", "features")),  # fields matched by input name
        "signature": lambda: udf(),  # the signature's input names as column names
    }[call]()
    rows = sorted(df.select("id", column.alias("p")).collect(), key=lambda r: r.id)

    on_driver = mlflow.pyfunc.load_model(two)
    expected = on_driver.predict(batch)
    assert set(expected) == {"score", "embedding"}
    for name, width in (("score", 1), ("embedding", 4)):
        got = np.array([r.p[name] for r in rows], dtype=np.float32)
        assert got.shape == expected[name].shape == (ROWS, width)
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=CLOSE)

    loaded = spark.loaded_since(offset, expected=1)
    assert loaded and {vid for vid, _ in loaded} == {on_driver.get_raw_model().variant.id}, spark.stderr_tail()
    fetched = _fetched(Path(extra_env["CHIMERA_CACHE_DIR"]))
    assert fetched.get("variants") == [on_driver.get_raw_model().variant.content_key()], fetched


# -- which URI an executor's load answers to ----------------------------------------------------


def test_only_the_udfs_own_load_answers_to_its_uri(monkeypatch, tmp_path):
    """The executor's load is checked against the URI the UDF was made for only when it is the
    UDF's own load of its model; a model that some other model's code loads inside a UDF keeps
    its own (local) source. Frames are stand-ins with the names spark_udf's have."""
    from mlflow_chimera import trust

    monkeypatch.delenv(trust.MODEL_URI_ENV, raising=False)
    scope = {"__name__": "mlflow.pyfunc", "trust": trust}
    exec(textwrap.dedent("""
        def load_model(model_uri):
            return trust.requested_source()

        def udf(model_uri, local_model_path, through=None):
            return (through or load_model)(local_model_path)
    """), scope)
    user_code = {"__name__": "some_user_model", "load_model": scope["load_model"]}
    exec("def load_context(path):\n    return load_model(path)\n", user_code)

    local = str(tmp_path / "model")
    assert scope["udf"]("models:/clf/3", local).uri == "models:/clf/3"
    assert scope["udf"]("models:/clf/3", local).tracked
    assert scope["udf"]("models:/clf/3", local, through=user_code["load_context"]).uri == local
    assert scope["load_model"](local).uri == local  # no UDF at all
