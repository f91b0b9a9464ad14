"""The runner shared by torch-based variants (eager, AOTInductor, torch.compile): numpy in,
the model called as it was captured (positional and keyword inputs), numpy out."""

from __future__ import annotations

import contextlib
import threading


class TorchRunner:
    """Calls ``fn`` under ``torch.inference_mode``. ``serialize=True`` lets one thread in at a
    time, for callables that are not safe to re-enter (a compiler may run on a new shape)."""

    def __init__(self, fn, signature, device: str = "cpu", serialize: bool = False):
        import torch

        self._torch = torch
        self._fn = fn
        self._signature = signature
        self._device = device
        self._lock = threading.Lock() if serialize else contextlib.nullcontext()

    def run(self, inputs: dict) -> list:
        from mlflow_chimera.reference import flatten_outputs

        torch = self._torch
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        if self._device != "cpu":
            tensors = {k: t.to(self._device) for k, t in tensors.items()}
        args, kwargs = self._signature.split_call(tensors)
        with self._lock, torch.inference_mode():
            out = self._fn(*args, **kwargs)
        return flatten_outputs(out)[0]
