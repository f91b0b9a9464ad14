"""A small fork server for builds: ``python -m mlflow_chimera.compile.buildserver``.

It imports torch, ONNX Runtime and onnx once, and loads each model's reference program once
(children inherit both); then, for each job line (JSON) it reads on stdin,
forks a child that runs :func:`mlflow_chimera.compile.worker.run_job` (or, for a ``"kind":
"time"`` line, :func:`~mlflow_chimera.compile.worker.run_timing`) with its output sent to the
job's log file. It reports on stdout, one line each: ``started <job> <pid>`` and
``exited <job> <code>`` (``-N`` for signal N). The parent enforces time limits by killing a
child's pid.

Why not ``multiprocessing``'s forkserver: it re-imports the caller's ``__main__`` in every
child, which re-runs a user's script that has no ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import json
import os
import select
import sys
import traceback


def _run_child(job: dict) -> None:
    fd = os.open(job["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        from mlflow_chimera.compile import worker

        if job.get("kind") == "time":
            worker.run_timing(worker.TimingJob.from_dict(job["job"]))
        else:
            worker.run_job(worker.BuildJob.from_dict(job["job"]))
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(children: dict, out) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(f"exited {children.pop(pid)} {code}\n")
        out.flush()


def _preload(job: dict) -> None:
    """Load the job's reference program here, once per model, so that every child inherits it.
    A program that fails to load is left for the child to load, which records the error."""
    spec = job.get("job") or {}
    if job.get("kind", "build") == "build" and spec.get("program_path") and spec.get("reference_sha256"):
        from mlflow_chimera.compile import worker

        try:
            worker.preload_program(spec["program_path"], spec["reference_sha256"])
        except Exception:  # noqa: BLE001 - the child meets the same error and reports it
            pass


def main() -> None:
    import torch  # noqa: F401  (imported once here, inherited by every child)

    for optional in ("onnxruntime", "onnx"):  # imported once here too, where installed
        try:
            __import__(optional)
        except ImportError:
            pass
    import mlflow_chimera.compile.worker  # noqa: F401

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    children, stdin_open = {}, True
    while stdin_open or children:
        if stdin_open:
            readable, _, _ = select.select([sys.stdin], [], [], 0.05)
            if readable:
                line = sys.stdin.readline()
                if not line:
                    stdin_open = False
                elif line.strip():
                    job = json.loads(line)
                    _preload(job)
                    pid = os.fork()
                    if pid == 0:
                        _run_child(job)
                    children[pid] = job["name"]
                    out.write(f"started {job['name']} {pid}\n")
                    out.flush()
        else:
            select.select([], [], [], 0.05)
        _reap(children, out)


if __name__ == "__main__":
    main()
