"""Served throughput and latency: ``mlflow models serve`` (uvicorn, ``-w 1`` for every flavor)
on 127.0.0.1, under a bounded closed-loop load from threads of the benchmark process.

Each flavor's server is started in turn (spawn → first ``/ping`` 200 is its startup time) and
all stay up; then, for several rounds with the flavor order rotating, each server gets a
closed-loop load at every concurrency level for a fixed slice of time: ``c`` threads, each on
its own keep-alive HTTP connection, sending one batch-1 ``{"inputs": …}`` JSON request and
waiting for its answer before sending the next. Every request is bounded (a count cap per slice,
a timeout per request), and every server is stopped with its whole process group.

The JSON payload is encoded once. On a 2-core host the client threads share the cores with the
server, so absolute throughput is lower than with a separate client machine; the client's cost
is the same for all three flavors. For large inputs (the transformer's 128×256 floats per
example) JSON encoding and decoding dominate the served latency of every flavor.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import QUIET_ENV, BackgroundLoad, first_output

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 30
# The contenders: (which logged model, SERVING_MODEL_CONFIG). chimera_batched is the same
# chimera model served with dynamic batching on (mlflow_chimera/batching.py).
BATCHING = {"max_batch_size": 32, "max_delay_ms": 2}
CONTENDERS = {"chimera": ("chimera", None), "chimera_batched": ("chimera", {"batching": BATCHING}),
              "pytorch": ("pytorch", None), "onnx": ("onnx", None)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``mlflow models serve`` process group."""

    def __init__(self, uri: str, tracking_uri: str, workers: int = 1, extra_env: dict | None = None):
        env = dict(os.environ)
        for key in ("SERVING_MODEL_CONFIG", "MLFLOW_PYFUNC_INFERENCE_CONFIG", "PYTHONPATH"):
            env.pop(key, None)
        env.update(QUIET_ENV)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        env["MLFLOW_REGISTRY_URI"] = tracking_uri
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env or {})
        self.uri = uri
        self.port = _free_port()
        log = tempfile.NamedTemporaryFile(prefix="chimera-bench-serve-", suffix=".log", delete=False)
        self.log_path = log.name
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(self.port), "-w", str(workers)]
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.startup_s = None

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_ready(self) -> float:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server for {self.uri} exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ping")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    self.startup_s = time.time() - self.started
                    return self.startup_s
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server for {self.uri} did not answer /ping in {STARTUP_TIMEOUT_S} s:\n"
                                   f"{self.output()[-4000:]}")
            time.sleep(0.05)

    def post(self, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def rss_mb(self) -> float | None:
        """Resident memory of the server's process tree (psutil), MB."""
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
            return sum(p.memory_info().rss for p in procs) / 2**20
        except Exception:  # noqa: BLE001 - psutil missing or a process just exited
            return None

    def loaded_variant(self) -> str | None:
        found = re.findall(r"chimera: loaded variant (\S+)", self.output())
        return found[-1] if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)  # mlflow's CLI and the uvicorn it starts
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def closed_loop(port: int, body: bytes, concurrency: int, seconds: float, max_requests: int) -> dict:
    """``concurrency`` threads, each sending the next request when the previous one answered,
    for ``seconds`` or until ``max_requests`` in all. Returns latencies (s) and counts."""
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    latencies, errors, issued = [], [], [0]
    headers = {"Content-Type": "application/json"}

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        mine = []
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        break
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/invocations", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
                t1 = time.perf_counter()
                if status == 200:
                    mine.append(t1 - t0)
                else:
                    with lock:
                        errors.append(status)
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + REQUEST_TIMEOUT_S + 5)
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - started}


def _batched_vs_unbatched(batched: Server, plain: Server, spec, requests: int = 16) -> float:
    """Send ``requests`` different inputs (batch 1 to 4) to the batched server at once and to
    the unbatched one in turn; the largest difference between the answers."""
    bodies = [json.dumps({"inputs": spec.make_input(1 + i % 4, 100 + i).tolist()}).encode() for i in range(requests)]
    answers = [None] * requests

    def ask(i):
        answers[i] = batched.post(bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    worst = 0.0
    for body, answer in zip(bodies, answers):
        status, content = answer or (None, b"")
        if status != 200:
            raise RuntimeError(f"batched server answered {status}: {content[:300]!r}")
        expected = first_output(json.loads(plain.post(body)[1])["predictions"])
        got = first_output(json.loads(content)["predictions"])
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))))
    return worst


def mlflow_request_handling_ms(model_uri: str, body: bytes, answer: list, repeats: int = 15) -> float:
    """Median time MLflow's scoring server spends on one request outside ``predict``: its own
    ``invocations`` (parse the JSON, check it against the signature, write the JSON answer)
    called in this process with a model that returns ``answer`` at once. Every flavor pays it,
    on the GIL; dynamic batching cannot merge it away."""
    from mlflow.models import Model
    from mlflow.pyfunc import scoring_server

    metadata = Model.load(model_uri)
    output = np.asarray(answer, dtype=np.float32)

    class Answering:
        def __init__(self):
            self.metadata = metadata

        def predict(self, data, params=None):
            return output

    model, schema = Answering(), metadata.get_input_schema()
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        response = scoring_server.invocations(body, "application/json", model, schema)
        times.append(time.perf_counter() - t0)
        if getattr(response, "status", 200) != 200:
            raise RuntimeError(f"invocations answered {response.status}: {str(response.response)[:300]}")
    return float(np.median(times[2:]) * 1e3)


def measure(spec, logged: dict, tracking_uri: str, *, concurrency: list, seconds_per_level: float,
            rounds: int, max_requests: int, warmup_requests: int, expected_fn=None) -> dict:
    """Serve every flavor of one model and load them in interleaved rounds."""
    x = spec.make_input(1, 5)
    body = json.dumps({"inputs": x.tolist()}).encode()
    servers, out = {}, {"payload_bytes": len(body), "workers": 1, "concurrency": list(concurrency),
                        "rounds": rounds, "seconds_per_level": seconds_per_level, "flavors": {}}
    try:
        for flavor, (source, serving_config) in CONTENDERS.items():
            extra = {"SERVING_MODEL_CONFIG": json.dumps(serving_config)} if serving_config else None
            server = Server(logged[source]["uri"], tracking_uri, extra_env=extra)
            servers[flavor] = server
            server.wait_ready()
            status, content = server.post(body)
            if status != 200:
                raise RuntimeError(f"{flavor} server answered {status}: {content[:500]!r}")
            prediction = json.loads(content)["predictions"]
            entry = {"startup_s": server.startup_s}
            if expected_fn is not None:
                got = first_output(prediction)
                entry["max_abs_error_vs_eager"] = float(np.max(np.abs(got.astype(np.float64) - expected_fn(x))))
            for _ in range(warmup_requests):
                server.post(body)
            entry["rss_mb"] = server.rss_mb()
            if source == "chimera":
                entry["variant"] = server.loaded_variant()
            if flavor == "chimera":
                out["mlflow_request_handling_ms"] = mlflow_request_handling_ms(
                    logged[source]["uri"], body, first_output(prediction))
            out["flavors"][flavor] = entry
        out["flavors"]["chimera_batched"]["max_abs_diff_vs_unbatched"] = _batched_vs_unbatched(
            servers["chimera_batched"], servers["chimera"], spec)
        samples = {f: {c: {"latencies": [], "errors": [], "elapsed": 0.0} for c in concurrency} for f in servers}
        names = list(servers)
        with BackgroundLoad(exclude_pids=[s.proc.pid for s in servers.values()]) as background:
            for r in range(rounds):
                k = r % len(names)
                order = names[k:] + names[:k]
                if r % 2:
                    order.reverse()
                for f in order:
                    for c in concurrency:
                        time.sleep(0.05)
                        res = closed_loop(servers[f].port, body, c, seconds_per_level, max_requests)
                        acc = samples[f][c]
                        acc["latencies"] += res["latencies"]
                        acc["errors"] += res["errors"]
                        acc["elapsed"] += res["elapsed"]
        out["background_cpu_cores_excluding_servers"] = background.cores
        for f in names:
            levels = {}
            for c in concurrency:
                acc = samples[f][c]
                lat = np.asarray(acc["latencies"]) * 1e3
                levels[str(c)] = {
                    "requests": int(lat.size),
                    "errors": len(acc["errors"]),
                    "error_kinds": sorted({str(e) for e in acc["errors"]})[:5],
                    "throughput_rps": float(lat.size / acc["elapsed"]) if acc["elapsed"] else 0.0,
                    "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                    "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                }
            out["flavors"][f]["levels"] = levels
            out["flavors"][f]["rss_mb_after_load"] = servers[f].rss_mb()
    finally:
        for s in servers.values():
            s.stop()
    return out
