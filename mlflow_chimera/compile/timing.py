"""Latency measurement: warm up, then time windows of calls until the window medians are
stable (coefficient of variation under a threshold) or a time cap is reached, and report
percentiles over every timed call of the windows kept."""

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
    """Time ``fn()``; return p50/p90/p99 in milliseconds, the call count and the final CV."""
    clock = time.perf_counter
    start = clock()
    calls = 0
    while calls < config.warmup_calls or clock() - start < config.warmup_seconds:
        fn()
        calls += 1
        if clock() - start > config.max_seconds / 4:
            break
    deadline = clock() + config.max_seconds
    samples, medians = [], []
    cv = float("inf")
    while True:
        window, window_end = [], clock() + config.window_seconds
        while True:
            t0 = clock()
            fn()
            t1 = clock()
            window.append(t1 - t0)
            if t1 >= window_end:
                break
        samples.extend(window)
        medians.append(statistics.median(window))
        recent = medians[-config.min_windows:]
        if len(recent) == config.min_windows:
            cv = statistics.pstdev(recent) / statistics.mean(recent)
            if cv < config.target_cv:
                break
        if clock() >= deadline:
            break
    ms = np.asarray(samples) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "calls": len(samples),
        "windows": len(medians),
        "cv": round(float(cv), 4) if cv != float("inf") else None,
    }
