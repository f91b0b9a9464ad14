"""torch.compile variants: the reference program run under ``torch.compile`` at load, shipping
the Inductor cache built at log time so a matching host starts without recompiling.

At build the program is compiled (dynamic batch) and exercised at batch 1 and the example's
batch; the artifacts Inductor produced are saved with ``torch.compiler.save_cache_artifacts``
into ``compile_cache.bin``, with the cold start (first call, compiling) in the provenance. At
load, ``load_cache_artifacts`` puts them back into Inductor's cache before compiling, and the
model is warmed up so serving starts warm; the load time recorded at log time is that warm
start. The cache holds Inductor's generated code and pickled graph entries, like any Inductor
cache: it is loaded only after its sha256 matched the variant's record (runtime.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np

from mlflow_chimera.backends.base import (
    BuildContext,
    BuildOutput,
    LoadContext,
    VariantPlan,
    listed_file,
    major_minor,
    pin_requirement,
)
from mlflow_chimera.backends.torch_runner import TorchRunner
from mlflow_chimera.host import fingerprint, installed_version
from mlflow_chimera.manifest import CHECK_INPUTS

CACHE_FILE = "compile_cache.bin"
_COMPILE_OPTIONS = {"dynamic": True, "fullgraph": False, "mode": "default"}


def _compile(program_module, options: dict):
    import torch

    return torch.compile(program_module, dynamic=options.get("dynamic", True),
                         fullgraph=options.get("fullgraph", False), mode=options.get("mode", "default"))


def _warm_up(compiled, signature, example: dict) -> float:
    """Call the compiled module at batch 1 and at the example's batch; seconds taken."""
    import torch

    started = time.perf_counter()
    for batch in sorted({1, next(iter(example.values())).shape[0]}):
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a[:batch])) for n, a in example.items()}
        args, kwargs = signature.split_call(tensors)
        with torch.inference_mode():
            compiled(*args, **kwargs)
    return time.perf_counter() - started


@contextlib.contextmanager
def _private_inductor_cache(key: str):
    """Inductor's cache directory pointed at a private one while the shipped cache is loaded and
    the model compiled, so its entries never land in the host-wide Inductor cache, where later,
    unrelated processes would load them."""
    from mlflow_chimera.cache import writable_root

    folder = Path(writable_root(), "inductor", key[:32], f"{os.getpid()}-{threading.get_ident()}")
    folder.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


class TorchCompileBackend:
    name = "torch_compile"
    needs_torch_at_runtime = True
    native_code = True  # the cache holds pickles and generated code: loaded only from a trusted record

    def build_unavailable_reason(self) -> str | None:
        from mlflow_chimera.backends.aotinductor import AOTInductorBackend

        return AOTInductorBackend().build_unavailable_reason()  # same needs: torch and a C++ compiler

    def plan(self, precisions: list, host) -> list:
        if "fp32" not in precisions:
            return []
        return [VariantPlan(id="torch_compile-fp32-cpu", backend=self.name, precision="fp32",
                            target="cpu", options=dict(_COMPILE_OPTIONS))]

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import torch

        # A private, empty Inductor cache: everything this compilation needs ends up in the
        # saved artifacts, not split between them and what an earlier build left on this host.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(context.scratch_dir, f"inductor-{plan.id}"))
        torch._dynamo.reset()
        compiled = _compile(context.program.module(), plan.options)
        cold = _warm_up(compiled, context.signature, context.example)
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compile produced no cache artifacts to ship")
        artifact_bytes, info = saved
        Path(out_dir, CACHE_FILE).write_bytes(artifact_bytes)
        return BuildOutput(
            provenance={
                "compiler": "torch.compile (Inductor)",
                "compiler_version": torch.__version__,
                "triton_version": installed_version("triton"),
                "device": "cpu",
                "compile_options": plan.options,
                "cold_start_seconds": round(cold, 3),
                "cache_artifacts": {k: len(v) for k, v in vars(info).items() if isinstance(v, list)},
                "cpu_flags": list(fingerprint().isa),
            },
            requirements={"device": "cpu", "arch": fingerprint().arch,
                          "packages": {"torch": major_minor(torch.__version__)}},
        )

    def incompatibility(self, variant, host) -> str | None:
        torch_version = host.packages.get("torch")
        if not torch_version:
            return "torch is not installed on this host"
        built_with = variant.requirements.get("packages", {}).get("torch")
        if built_with and major_minor(torch_version) != built_with:
            return f"its compile cache is for torch {built_with}; this host has torch {torch_version}"
        if variant.requirements.get("arch") not in (None, host.arch):
            return f"its compile cache is for {variant.requirements['arch']}; this host is {host.arch}"
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext) -> TorchRunner:
        import torch

        from mlflow_chimera.reference import load_program

        program = load_program(context.reference_path(), context.reference_sha256)
        with np.load(Path(context.model_dir, CHECK_INPUTS), allow_pickle=False) as data:
            example = {k: data[k] for k in data.files}
        with _private_inductor_cache(variant.content_key()):
            torch.compiler.load_cache_artifacts(listed_file(variant, variant_dir, CACHE_FILE).read_bytes())
            compiled = _compile(program.module(), variant.options)
            _warm_up(compiled, context.signature, example)
        # Dynamo may recompile for an unseen shape; compilation is not thread-safe.
        return TorchRunner(compiled, context.signature, serialize=True)

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("torch", variant)]
