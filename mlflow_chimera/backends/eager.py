"""The eager reference: the reference program itself, run by torch. Runs anywhere torch runs;
the last resort of selection. Its only file is the reference program, whose digest MLmodel
records, so the variant directory holds just ``variant.json``."""

from __future__ import annotations

from pathlib import Path

from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.base import (
    BuildContext,
    BuildOutput,
    LoadContext,
    VariantPlan,
    major_minor,
    pin_requirement,
)
from mlflow_chimera.backends.torch_runner import TorchRunner
from mlflow_chimera.manifest import REFERENCE_PROGRAM


class EagerBackend:
    name = "eager"
    needs_torch_at_runtime = True

    def build_unavailable_reason(self) -> str | None:
        return None if host_mod.installed_version("torch") else "torch is not installed"

    def plan(self, precisions: list, host) -> list:
        if "fp32" not in precisions:
            return []
        return [VariantPlan(id="eager-fp32-cpu", backend=self.name, precision="fp32", target="cpu")]

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import torch

        return BuildOutput(
            provenance={
                "compiler": "torch.export (eager interpreter)",
                "compiler_version": torch.__version__,
                "uses_reference": REFERENCE_PROGRAM,
            },
            requirements={"device": "cpu", "packages": {"torch": major_minor(torch.__version__)}},
        )

    def incompatibility(self, variant, host) -> str | None:
        installed = host.packages.get("torch")
        if not installed:
            return "torch is not installed on this host"
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext):
        from mlflow_chimera.reference import load_program

        program = load_program(context.reference_path(), context.reference_sha256)
        return TorchRunner(program.module(), context.signature)

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("torch", variant)]

