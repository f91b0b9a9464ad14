"""Dynamic batching: concurrent ``predict`` calls merged along the batch axis and run once.

``mlflow models serve`` calls ``predict`` once per request, each in its own thread, so
concurrent requests queue behind each other while the model could run them as one batch.
With ``model_config={"batching": {"max_batch_size": 32, "max_delay_ms": 2}}`` (or the same
in ``SERVING_MODEL_CONFIG``), a caller's checked inputs join a queue; one worker thread takes
the oldest request, waits up to ``max_delay_ms`` for more whose non-batch shapes match, runs
them as one batch of at most ``max_batch_size`` rows, and hands every caller exactly its own
rows. Inputs are checked before they join, so a malformed request fails alone; an error while
running fails the callers of that batch only, and the worker goes on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_DELAY_MS = 2.0


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS

    @classmethod
    def from_setting(cls, value, max_batch: int) -> "BatchingConfig | None":
        """``None`` (off) for ``None``/``"off"``/``"auto"``/``False``; else a checked config
        from a dict (``max_batch_size``, ``max_delay_ms``) or ``True`` (defaults)."""
        if value in (None, False, "off", "auto", ""):
            return None
        if value is True or value == "on":
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"model_config batching {value!r} is not understood; expected 'off' or "
                             "{'max_batch_size': 32, 'max_delay_ms': 2}")
        unknown = sorted(set(value) - {"max_batch_size", "max_delay_ms"})
        if unknown:
            raise ValueError(f"model_config batching keys {unknown} are not known; expected max_batch_size, "
                             "max_delay_ms")
        try:
            size = int(value.get("max_batch_size", 32))
            delay = float(value.get("max_delay_ms", DEFAULT_MAX_DELAY_MS))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_config batching {value!r}: {exc}") from None
        if not 1 <= size <= max_batch:
            raise ValueError(f"model_config batching max_batch_size {size} must be between 1 and {max_batch}")
        if not 0 <= delay <= 1000:
            raise ValueError(f"model_config batching max_delay_ms {delay:g} must be between 0 and 1000")
        return cls(size, delay)


@dataclass(eq=False)  # identity: the queue removes *this* request, never compares arrays
class _Request:
    inputs: dict  # {name: ndarray}, checked, batch first
    rows: int
    shape_key: tuple  # non-batch shapes and dtypes: requests with the same key can be merged
    future: Future
    arrived: float  # time.monotonic() when it joined the queue


class DynamicBatcher:
    """Runs ``run({name: ndarray}) -> [ndarray]`` on merged batches from one worker thread."""

    def __init__(self, run, config: BatchingConfig):
        self._run = run
        self.config = config
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._forming: list = []  # requests taken off the queue for the batch being formed
        self.batches_run = 0  # for tests and monitoring: how many merged runs happened
        self._worker = threading.Thread(target=self._loop, name="chimera-batcher", daemon=True)
        self._worker.start()

    def submit(self, inputs: dict) -> list:
        """Run ``inputs`` as part of a batch; returns this caller's outputs (its rows only)."""
        rows = next(iter(inputs.values())).shape[0]
        if rows >= self.config.max_batch_size:
            return self._run(inputs)  # already a full batch: nothing to wait for
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))
        request = _Request(inputs, rows, key, Future(), time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(request)
            self._cond.notify()
        return request.future.result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # -- the worker ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except BaseException as exc:  # noqa: BLE001 - a bug here must not strand every caller
                self._fail_waiting(exc)
                continue
            if batch is None:
                return
            self._execute(batch)

    def _fail_waiting(self, exc: BaseException) -> None:
        with self._cond:
            waiting, self._queue = self._forming + list(self._queue), deque()
            self._forming = []
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(exc)

    def _next_batch(self) -> list | None:
        """The oldest request and those that can join it, waiting up to ``max_delay_ms`` from
        when the oldest arrived for the batch to fill."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = self._forming, first.rows
            batch.append(first)
            deadline = first.arrived + self.config.max_delay_ms / 1000
            while rows < self.config.max_batch_size:
                joined = self._take_matching(first.shape_key, self.config.max_batch_size - rows)
                if joined is not None:
                    batch.append(joined)
                    rows += joined.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._forming = []
            return batch

    def _take_matching(self, key: tuple, room: int) -> _Request | None:
        for request in self._queue:
            if request.shape_key == key and request.rows <= room:
                self._queue.remove(request)
                return request
        return None

    def _execute(self, batch: list) -> None:
        try:
            if len(batch) == 1:
                outputs = self._run(batch[0].inputs)
            else:
                merged = {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
                outputs = self._run(merged)
            self.batches_run += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the callers of this batch only
            for request in batch:
                request.future.set_exception(exc)
            return
        start = 0
        for request in batch:
            request.future.set_result([out[start:start + request.rows] for out in outputs])
            start += request.rows
