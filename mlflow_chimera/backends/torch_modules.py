"""Small torch modules used by builds. Imports torch: import this module only inside a build."""

from __future__ import annotations

import torch


class TraceableProgram(torch.nn.Module):
    """An exported program's module in a form the TorchScript tracer accepts.

    The tracer toggles ``train()``, which the module of an ``ExportedProgram`` refuses; the
    program is captured in eval mode already, so toggling is a no-op here.
    """

    def __init__(self, program_module):
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True):
        return self

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)
