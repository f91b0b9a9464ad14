"""Shared pieces: host description, contention measurement, interleaved timing, statistics."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

# Background CPU use (cores) above which a measurement is flagged as taken on a contended host.
BUSY_HOST_CORES = 0.25

# Keep every process of the suite (and the ones it starts) off the network: MLflow's usage
# telemetry would otherwise try to reach an outside host.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TOKENIZERS_PARALLELISM": "false",
             "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# -- host --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list:
    """A few ISA flags that matter for these backends."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(dist)
    except PackageNotFoundError:
        return None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def host_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gib": memory_gib(),
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("mlflow", "torch", "onnxruntime", "onnx", "onnxscript",
                                             "transformers", "numpy", "mlflow-chimera")},
        "loadavg_start": loadavg(),
    }


class BackgroundLoad:
    """CPU time other processes used during the block, in cores (busy CPU time from /proc/stat
    minus this process's own CPU time, per wall second). ``cores`` is None where /proc/stat is
    missing. Child processes this process waits for count as "own" (``os.times`` includes
    waited-for children), servers it started do not: use ``exclude_pids`` for those."""

    def __init__(self, exclude_pids=()):
        self.exclude_pids = list(exclude_pids)

    def __enter__(self):
        self._start = self._snapshot()
        self.cores = None
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self._start and end:
            busy = end[0] - self._start[0]
            own = end[1] - self._start[1]
            wall = end[2] - self._start[2]
            self.cores = round(max(0.0, busy - own) / wall, 3) if wall > 0 else None

    def _snapshot(self):
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(values) - values[3] - values[4]) / tick  # all but idle and iowait
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        for pid in self.exclude_pids:
            own += _proc_cpu_seconds(pid, tick)
        return busy, own, time.monotonic()


# Seconds wait_for_quiet may still spend in this run (set by the runner; bounds the total).
WAIT_BUDGET = {"left_s": 0.0, "spent_s": 0.0}


def wait_for_quiet(max_wait_s: float, threshold_cores: float = BUSY_HOST_CORES, window_s: float = 1.0) -> dict:
    """Wait (up to ``max_wait_s``, and within the run's ``WAIT_BUDGET``) until other processes
    use less than ``threshold_cores`` over a ``window_s`` window. Returns how long it waited
    and the last load seen."""
    started = time.monotonic()
    cores = None
    limit = min(max_wait_s, WAIT_BUDGET["left_s"])
    if limit <= 0:
        return {"waited_s": 0.0, "cores": None}
    while True:
        with BackgroundLoad() as load:
            time.sleep(window_s)
        cores = load.cores
        if cores is None or cores < threshold_cores or time.monotonic() - started >= limit:
            break
    waited = time.monotonic() - started
    WAIT_BUDGET["left_s"] -= waited
    WAIT_BUDGET["spent_s"] += waited
    return {"waited_s": round(waited, 1), "cores": cores}


def _proc_cpu_seconds(pid: int, tick: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (utime+stime), 0 if gone."""
    total = 0.0
    try:
        import psutil

        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except Exception:  # noqa: BLE001 - psutil missing or the process is gone
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, IndexError):
        return 0.0


# -- quiet -------------------------------------------------------------------------------------


def quiet() -> None:
    """Silence MLflow's and torch's INFO logs and warnings. Call after importing mlflow and
    torch (importing them configures their loggers)."""
    for name in ("mlflow", "alembic", "torch", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def captured_output(enabled: bool = True):
    """Hold back what libraries print while logging models ("Successfully registered model …",
    exporter progress); replay it if something fails."""
    if not enabled:
        yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
        raise


# -- timing ------------------------------------------------------------------------------------


def estimate_seconds(fn, calls: int = 3, budget_s: float = 0.3, warm: bool = True) -> float:
    """The fastest of up to ``calls`` timed calls (fewer once ``budget_s`` is spent), after an
    untimed one if ``warm``: a first guess at the block size; the minimum resists a stall of
    the host during the estimate, and ``interleaved`` refines it from what it measures."""
    if warm:
        fn()
    times = []
    spent = 0.0
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > budget_s:
            break
    return min(times)


def interleaved(contenders: dict, *, min_rounds: int, max_rounds: int, budget_s: float, block_s: float,
                settle_s: float = 0.02, warmup_rounds: int = 1, max_calls: int = 200,
                block_warmup: int = 1, estimates: dict | None = None) -> dict:
    """Time every contender in blocks, rotating (and alternately reversing) the order each round.

    Each block is a pause of ``settle_s`` (ONNX Runtime's and torch's worker threads keep
    spinning for a while after a call; on a 2-core host they would steal cores from the next
    contender), ``block_warmup`` untimed calls, then about ``block_s`` of timed calls (at least
    one, at most ``max_calls``). The call count per block starts from ``estimates`` and follows
    the median of what was measured so far, so one stall of the host while estimating does not
    fix it for good. Rounds run until ``min_rounds`` are done and either ``max_rounds`` are done
    or ``budget_s`` is spent. GC is off while timing.

    Returns ``{name: {"samples": [s, …], "round_medians": [s, …], "calls_per_block": n}}``
    (``calls_per_block``: the median over rounds).
    """
    names = list(contenders)
    estimates = dict(estimates or {n: estimate_seconds(contenders[n]) for n in names})

    def block_calls(n):
        return max(1, min(max_calls, int(block_s / max(estimates[n], 1e-7))))

    out = {n: {"samples": [], "round_medians": [], "calls": []} for n in names}
    seen = {n: [] for n in names}
    clock = time.perf_counter
    started = clock()
    gc_was_enabled = gc.isenabled()
    r = -warmup_rounds
    try:
        while True:
            k = r % len(names)
            order = names[k:] + names[:k]
            if r % 2:  # alternate direction too, so no contender always follows the same one
                order.reverse()
            gc.collect()
            gc.disable()
            for n in order:
                fn = contenders[n]
                if settle_s:
                    time.sleep(settle_s)
                for _ in range(block_warmup):
                    fn()
                calls = block_calls(n)
                times = []
                for _ in range(calls):
                    t0 = clock()
                    fn()
                    times.append(clock() - t0)
                seen[n].extend(times)
                estimates[n] = statistics.median(seen[n])
                if r >= 0:
                    out[n]["samples"].extend(times)
                    out[n]["round_medians"].append(statistics.median(times))
                    out[n]["calls"].append(calls)
            gc.enable()
            r += 1
            if r >= min_rounds and (r >= max_rounds or clock() - started > budget_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for n in names:
        out[n]["calls_per_block"] = int(statistics.median(out[n].pop("calls")))
    return out


def summarize(samples: list) -> dict:
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p10_ms": float(np.percentile(ms, 10)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


def ratio_spread(numerator: list, denominator: list) -> dict:
    """Spread over rounds of ``numerator / denominator`` round medians."""
    ratios = np.asarray(numerator) / np.asarray(denominator)
    return {"median": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)), "rounds": int(ratios.size)}


def max_abs_error(got, expected: np.ndarray) -> float:
    got = first_output(got)
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - expected.astype(np.float64))))


def first_output(prediction):
    """The (first) output array of a pyfunc prediction: array, DataFrame or dict of arrays."""
    if isinstance(prediction, dict):
        prediction = next(iter(prediction.values()))
    if hasattr(prediction, "to_numpy"):
        prediction = prediction.to_numpy()
    return np.asarray(prediction)
