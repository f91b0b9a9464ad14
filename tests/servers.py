"""Background servers for tests (mlflow server, mlflow models serve, a local S3 server): started
on 127.0.0.1 on a free port, waited for, and always stopped with their whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_env(extra: dict | None = None) -> dict:
    """This interpreter's environment with its bin directory first on PATH (MLflow execs
    uvicorn/gunicorn by name)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: str):
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def output(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the whole group: a CLI and the workers it starts
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running(cmd: list, port: int, ready_path: str, env: dict, what: str, timeout: float = 120, cwd=None):
    """Start ``cmd`` (listening on ``port``), wait until ``ready_path`` answers 200, yield a
    :class:`ServerProcess`, and stop it however the test ends."""
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="chimera-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    log.close()
    server = ServerProcess(proc, url, log.name)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n{server.output()[-5000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not answer {ready_path} in {timeout} s:\n{server.output()[-5000:]}")
            time.sleep(0.25)
        yield server
    finally:
        stop(proc)
        with contextlib.suppress(OSError):
            os.unlink(log.name)
