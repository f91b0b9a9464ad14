"""Backends that misbehave on purpose, to test build isolation. Used as
``backends=["faulty_backends:Crashing"]``; they run in the build's child process (this folder
is on the child's path because the parent's sys.path is passed on)."""

from __future__ import annotations

import os
import signal
import time

from mlflow_chimera.backends.base import VariantPlan
from mlflow_chimera.backends.eager import EagerBackend
from mlflow_chimera.backends.onnx_runtime import OnnxRuntimeBackend
from mlflow_chimera.backends.openvino_backend import OpenVINOBackend


class _OnePlan(EagerBackend):
    kind = "faulty"

    def plan(self, precisions, host):
        return [VariantPlan(id=f"{self.kind}-fp32-cpu", backend=self.kind, precision="fp32", target="cpu")]


class Crashing(_OnePlan):
    """A compiler that segfaults."""

    kind = "crashing"

    def build(self, plan, out_dir, context):
        (out_dir / "partial.bin").write_bytes(b"half-written")
        print("compiler: about to crash", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)


class Hanging(_OnePlan):
    """A compiler that never returns."""

    kind = "hanging"

    def build(self, plan, out_dir, context):
        print("compiler: thinking forever", flush=True)
        time.sleep(3600)


class Raising(_OnePlan):
    """A compiler that raises an ordinary error."""

    kind = "raising"

    def build(self, plan, out_dir, context):
        raise RuntimeError("unsupported operator aten::frobnicate")


class DynamoFailsOnnxRuntime(OnnxRuntimeBackend):
    """ONNX Runtime whose dynamo exporter fails (no small model is known to fail it on torch 2.13
    yet pass the legacy exporter), so the legacy fallback runs for real."""

    def build(self, plan, out_dir, context):
        import torch

        real_export = torch.onnx.export

        def dynamo_fails(*args, dynamo=True, **kwargs):
            if dynamo:
                raise RuntimeError("simulated dynamo exporter failure")
            return real_export(*args, dynamo=False, **kwargs)

        torch.onnx.export = dynamo_fails
        try:
            return super().build(plan, out_dir, context)
        finally:
            torch.onnx.export = real_export


class DirectConversionFailsOpenVINO(OpenVINOBackend):
    """OpenVINO whose ExportedProgram conversion fails, so the ONNX route runs for real."""

    def build(self, plan, out_dir, context):
        import openvino

        real_convert = openvino.convert_model

        def program_fails(model, *args, **kwargs):
            if not isinstance(model, (str, os.PathLike)):
                raise RuntimeError("simulated ExportedProgram conversion failure")
            return real_convert(model, *args, **kwargs)

        openvino.convert_model = program_fails
        try:
            return super().build(plan, out_dir, context)
        finally:
            openvino.convert_model = real_convert
