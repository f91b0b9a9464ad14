"""Run builds in child processes with a time limit.

Each variant is built, checked and timed in its own child (see ``compile/worker.py``), so a
compiler that segfaults, hangs or runs out of memory fails only its own variant: the child's
exit status, the tail of its output and its duration are recorded and ``log_model`` goes on.

Children are forked by a build server (``compile/buildserver.py``) that has imported torch and
ONNX Runtime once, so a child starts in milliseconds. Jobs come in groups (one per backend,
run in order, so that e.g. int8 reuses the fp32 ONNX export on disk); groups run in parallel
only where the host has room (see :func:`default_parallelism`). Latency is measured after
every build has finished, by one child that times all the variants side by side
(:func:`run_timing`), so timings are never taken while a build runs.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from mlflow_chimera.manifest import BUILD_FAILED, VARIANT_FILE, Variant

_logger = logging.getLogger("mlflow.chimera")

DEFAULT_TIMEOUT_S = 900.0
_OUTPUT_TAIL = 4000


def default_parallelism() -> int:
    """Concurrent builds this host has room for: one per two cores, and 4 GiB of free memory
    each; 1 on a 2-core machine, where a second compiler would only slow the first."""
    cores = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 4.0
    return max(1, min(cores // 2, int(free_gib // 4)))


class BuildServer:
    """The parent's handle on one ``buildserver`` process (started on first use, reused)."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow_chimera.compile.buildserver"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the chimera build server did not start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def submit(self, name: str, job, log_path: Path, kind: str = "build") -> None:
        line = json.dumps({"name": name, "kind": kind, "log_path": str(log_path),
                           "job": dataclasses.asdict(job)})
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def events(self, timeout: float) -> list:
        """[(kind, name, value)] reported since the last call: ("started", name, pid) or
        ("exited", name, code)."""
        found = []
        while select.select([self.process.stdout], [], [], timeout)[0]:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the chimera build server exited unexpectedly")
            kind, name, value = line.split()
            found.append((kind, name, int(value)))
            timeout = 0
        return found

    def close(self) -> None:
        if self.alive():
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


_server: BuildServer | None = None


def _build_server() -> BuildServer:
    global _server
    if _server is None or not _server.alive():
        _server = BuildServer()
        atexit.register(_server.close)
    return _server


@dataclass
class _Running:
    job: object
    log_path: Path
    started: float
    pid: int | None = None
    exit_code: int | None = None
    timed_out: bool = False


def run_groups(groups: list, timeout_s: float = DEFAULT_TIMEOUT_S, parallelism: int | None = None,
               progress=None) -> list:
    """Run every job of ``groups`` (lists of jobs, each run in order) and return the Variant
    records in the order the jobs were given. A job that dies or times out gives a
    ``build_failed`` record saying how."""
    server = _build_server()
    parallelism = parallelism or default_parallelism()
    lanes = [deque(group) for group in groups]
    order = [job for group in groups for job in group]
    say = _Progress(len(order), progress)
    active, results = {}, {}  # lane index -> _Running; id(job) -> Variant
    while any(lanes) or active:
        for i, lane in enumerate(lanes):
            if lane and i not in active and len(active) < parallelism:
                active[i] = _start(server, lane.popleft(), say)
        by_name = {item.job.plan.id: item for item in active.values()}
        for kind, name, value in server.events(timeout=0.05):
            if kind == "started":
                by_name[name].pid = value
            else:
                by_name[name].exit_code = value
        for i, item in list(active.items()):
            if item.exit_code is None:
                if time.monotonic() - item.started < timeout_s or item.pid is None:
                    continue
                if not item.timed_out:
                    item.timed_out = True
                    os.kill(item.pid, signal.SIGKILL)
                continue  # wait for the server to report the exit
            if item.timed_out:
                results[id(item.job)] = _failed(item, f"timed out after {timeout_s:g} s and was killed")
            else:
                results[id(item.job)] = _collect(item)
            say.finished(results[id(item.job)], time.monotonic() - item.started)
            del active[i]
    return [results[id(job)] for job in order]


class _Progress:
    """One line per variant as its build starts and as it ends (with its outcome and elapsed
    time), on MLflow's logger and to the caller's ``progress`` callback (the CLI's stderr)."""

    def __init__(self, total: int, callback=None):
        self.total, self.done, self.callback = total, 0, callback

    def _say(self, message: str) -> None:
        _logger.info("chimera: %s", message)
        if self.callback:
            self.callback(message)

    def started(self, variant_id: str) -> None:
        self._say(f"[{self.done + 1}/{self.total}] building {variant_id}")

    def finished(self, variant: Variant, seconds: float) -> None:
        self.done += 1
        why = f": {variant.reason[:160]}" if variant.reason else ""
        self._say(f"[{self.done}/{self.total}] {variant.id} {variant.status} after {seconds:.1f} s{why}")


def _start(server: BuildServer, job, say: _Progress) -> _Running:
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(job.scratch_dir, f"{job.plan.id}.log")
    say.started(job.plan.id)
    server.submit(job.plan.id, job, log_path)
    return _Running(job, log_path, time.monotonic())


def _collect(item: _Running) -> Variant:
    code = item.exit_code
    record = Path(item.job.out_dir, VARIANT_FILE)
    if code == 0 and record.is_file():
        variant = Variant.load(item.job.out_dir)
        variant.provenance["isolation"] = {"exit_status": 0,
                                           "wall_seconds": round(time.monotonic() - item.started, 3)}
        variant.save(item.job.out_dir)
        return variant
    return _failed(item, _exit_words(code))


def _exit_words(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def run_timing(job, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[dict | None, str | None]:
    """Run one :class:`~mlflow_chimera.compile.worker.TimingJob` in a child: ``(result,
    None)``, or ``(None, why there is none)`` when the child died or ran out of time."""
    server = _build_server()
    log_path = Path(job.result_path).with_suffix(".log")
    server.submit("timing", job, log_path, kind="time")
    started, pid, code, timed_out = time.monotonic(), None, None, False
    while code is None:
        for kind, name, value in server.events(timeout=0.05):
            if name == "timing" and kind == "started":
                pid = value
            elif name == "timing":
                code = value
        if code is None and pid is not None and not timed_out and time.monotonic() - started > timeout_s:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
    result_path = Path(job.result_path)
    if code == 0 and result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8")), None
    how = f"timed out after {timeout_s:g} s and was killed" if timed_out else _exit_words(code)
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    except OSError:
        tail = []
    return None, f"the timing process {how}" + (f": {tail[0][:300]}" if tail else "")


def _failed(item: _Running, how: str) -> Variant:
    """A build_failed record for a child that did not finish its job, with its output tail."""
    job = item.job
    try:
        tail = item.log_path.read_bytes()[-_OUTPUT_TAIL:].decode("utf-8", "replace")
    except OSError:
        tail = ""
    last_line = next((ln for ln in reversed(tail.strip().splitlines()) if ln.strip()), "")
    variant = Variant(id=job.plan.id, backend=job.backend, precision=job.plan.precision,
                      target=job.plan.target, options=job.plan.options, status=BUILD_FAILED,
                      reason=f"build process {how}" + (f": {last_line[:300]}" if last_line else ""))
    variant.provenance = {
        "reference_sha256": job.reference_sha256,
        "build_host": job.host,
        "isolation": {"exit_status": item.exit_code, "outcome": how,
                      "wall_seconds": round(time.monotonic() - item.started, 3),
                      "output_tail": tail},
    }
    shutil.rmtree(job.out_dir, ignore_errors=True)  # half-written files must not look like a variant
    Path(job.out_dir).mkdir(parents=True)
    variant.save(job.out_dir)
    return variant
