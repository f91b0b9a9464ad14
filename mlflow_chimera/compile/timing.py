"""Latency measurement: warm up, then time windows of calls until the window medians are
stable (coefficient of variation under a threshold) or a time cap is reached, and report
percentiles over every timed call of the windows kept. Several callables are timed
interleaved, window by window, so that their figures are taken side by side."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class TimingConfig:
    warmup_seconds: float = 0.05
    warmup_calls: int = 3
    window_seconds: float = 0.05
    min_windows: int = 3
    max_seconds: float = 1.0  # per batch size
    target_cv: float = 0.10

    @classmethod
    def from_options(cls, options: dict | None) -> "TimingConfig":
        """Defaults, then ``CHIMERA_BENCH_MAX_SECONDS`` from the environment, then ``options``."""
        cfg = cls()
        if env := os.environ.get("CHIMERA_BENCH_MAX_SECONDS"):
            cfg.max_seconds = float(env)
        for key, value in (options or {}).items():
            if not hasattr(cfg, key):
                raise ValueError(f"unknown benchmark option {key!r}; known: {list(vars(cfg))}")
            setattr(cfg, key, type(getattr(cfg, key))(value))
        return cfg


def measure(fn, config: TimingConfig) -> dict:
    """Time one callable (see :func:`measure_interleaved`)."""
    return measure_interleaved({0: fn}, config)[0]


def measure_interleaved(fns: dict, config: TimingConfig) -> dict:
    """Time several callables side by side, so that their figures compare like with like.

    Each is warmed up; then, round after round, every callable gets one window of calls (the
    order rotates each round). Whatever else the host is doing slows all of them alike instead
    of whichever happened to be timed at that moment. Rounds stop when every callable's
    recent window medians are stable (coefficient of variation under ``target_cv``) or after
    ``max_seconds`` per callable.

    Returns ``{key: {"p50", "p90", "p99" (ms), "calls", "windows", "cv", "noise"}}``. ``noise``
    is the relative standard error of the figure (the spread of the window medians over the
    square root of their number): figures that differ by less than about twice it are a tie.
    """
    clock = time.perf_counter
    keys = list(fns)
    for key in keys:
        start, calls = clock(), 0
        while calls < config.warmup_calls or clock() - start < config.warmup_seconds:
            fns[key]()
            calls += 1
            if clock() - start > config.max_seconds / 4:
                break
    samples = {key: [] for key in keys}
    medians = {key: [] for key in keys}
    deadline = clock() + config.max_seconds * len(keys)
    rounds = 0
    while True:
        for key in keys[rounds % len(keys):] + keys[:rounds % len(keys)]:
            fn, window, window_end = fns[key], [], clock() + config.window_seconds
            while True:
                t0 = clock()
                fn()
                t1 = clock()
                window.append(t1 - t0)
                if t1 >= window_end:
                    break
            samples[key].extend(window)
            medians[key].append(statistics.median(window))
        rounds += 1
        if rounds >= config.min_windows and all(
                _cv(m[-config.min_windows:]) < config.target_cv for m in medians.values()):
            break
        if clock() >= deadline:
            break
    return {key: _summary(samples[key], medians[key], config.min_windows) for key in keys}


def _cv(values: list) -> float:
    mean = statistics.mean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


def _summary(samples: list, medians: list, recent: int) -> dict:
    ms = np.asarray(samples) * 1e3
    cv = _cv(medians[-recent:]) if len(medians) >= recent else None
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "calls": len(samples),
        "windows": len(medians),
        "cv": None if cv is None else round(float(cv), 4),
        "noise": round(float(_cv(medians) / len(medians) ** 0.5), 4) if len(medians) > 1 else None,
    }


def pin_threads() -> dict:
    """Fix torch's intra-op thread count for the measurement (``CHIMERA_TIMING_THREADS``, else
    the count torch uses by default here, which is what a serving process gets) and return the
    thread settings the figures are taken with, to be recorded beside them. Runtimes other
    than torch take their thread counts from each variant's own options."""
    import sys

    threads = {"cpu_count": os.cpu_count() or 1}
    torch = sys.modules.get("torch")
    if torch is not None:
        wanted = int(os.environ.get("CHIMERA_TIMING_THREADS") or torch.get_num_threads())
        torch.set_num_threads(wanted)
        threads["torch_intra_op"] = torch.get_num_threads()
    return threads
