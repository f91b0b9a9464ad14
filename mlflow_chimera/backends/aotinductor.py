"""AOTInductor variants: the reference program compiled ahead of time to a native shared
library (``torch._inductor.aoti_compile_and_package``) with a dynamic batch.

Compatibility (DESIGN §5): same device type; same torch major.minor; CPU packages are tied to
the CPU architecture and the vector instruction set Inductor compiled them for (the variant
records the exact CPU flags that needs); CUDA packages to the compute capability they contain.
The package holds native code: its sha256 is verified before it is loaded (runtime.py), and
its pickled entries must pass ``weights_only`` loading like the reference program's.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
from pathlib import Path

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

PACKAGE_FILE = "model.pt2"
# Inductor's vector ISA classes → a short name for the variant id, and the CPU flags (as in
# /proc/cpuinfo) a host needs to run code compiled for it.
_ISA = {
    "VecAMX": ("amx", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "amx_tile")),
    "VecAVX512": ("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    "VecAVX2": ("avx2", ("avx2", "fma")),
    "VecNEON": ("neon", ("asimd",)),
    "VecSVE256": ("sve256", ("sve",)),
}


def _vec_isa() -> tuple[str, str, tuple]:
    """(Inductor's ISA class name, short name, required CPU flags) on this host."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    name = type(isa).__name__
    short, flags = _ISA.get(name, (str(isa).split()[0] if str(isa) else "generic", ()))
    return name, short, flags


def _cuda_capability() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


class AOTInductorBackend:
    name = "aotinductor"
    needs_torch_at_runtime = True
    native_code = True  # a shared library: loaded only from a trusted record (trust.py)

    def build_unavailable_reason(self) -> str | None:
        from mlflow_chimera.host import installed_version

        if not installed_version("torch"):
            return "torch is not installed"
        if not (shutil.which("g++") or shutil.which("c++")):
            return "no C++ compiler (g++) on PATH"
        return None

    def plan(self, precisions: list, host) -> list:
        if "fp32" not in precisions:
            return []
        isa_name, short, flags = _vec_isa()
        plans = [VariantPlan(
            id=f"aotinductor-fp32-cpu-{host.arch}-{short}", backend=self.name, precision="fp32",
            target="cpu", options={"device": "cpu", "vec_isa": isa_name, "cpu_flags": list(flags)},
        )]
        if capability := _cuda_capability():
            plans.append(VariantPlan(
                id=f"aotinductor-fp32-sm{capability}", backend=self.name, precision="fp32",
                target=f"cuda-sm{capability}", options={"device": "cuda", "compute_capability": capability},
            ))
        return plans

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import torch

        program = context.program
        if plan.options["device"] == "cuda":
            program = _reexport_on_cuda(context)
        with _size_oblivious():
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(out_dir, PACKAGE_FILE)))
        requirements = {"device": plan.options["device"], "arch": platform.machine().lower(),
                        "packages": {"torch": major_minor(torch.__version__)}}
        if plan.options["device"] == "cpu":
            requirements["cpu_flags"] = plan.options["cpu_flags"]
        else:
            requirements["compute_capability"] = plan.options["compute_capability"]
        return BuildOutput(
            provenance={
                "compiler": "torch._inductor.aoti_compile_and_package",
                "compiler_version": torch.__version__,
                "vec_isa": plan.options.get("vec_isa"),
                "cxx": shutil.which("g++") or shutil.which("c++"),
                "package": Path(package).name,
                "dynamic_batch": True,
                "size_oblivious_compile": _OBLIVIOUS_NOTE,
            },
            requirements=requirements,
        )

    def incompatibility(self, variant, host) -> str | None:
        req = variant.requirements
        torch_version = host.packages.get("torch")
        if not torch_version:
            return "torch is not installed on this host"
        built_with = req.get("packages", {}).get("torch")
        if built_with and major_minor(torch_version) != built_with:
            return f"compiled with torch {built_with}; this host has torch {torch_version} (must match major.minor)"
        if req.get("arch") and req["arch"] != host.arch:
            return f"compiled for {req['arch']}; this host is {host.arch}"
        if req.get("device") == "cuda":
            capabilities = {g.compute_capability.replace(".", "") for g in host.gpus}
            if req.get("compute_capability") not in capabilities:
                return (f"compiled for compute capability {req.get('compute_capability')}; this host's GPUs: "
                        f"{sorted(capabilities) or 'none'}")
            return None
        missing = [f for f in req.get("cpu_flags", []) if f not in host.isa]
        if missing:
            return (f"compiled for {variant.options.get('vec_isa', 'a newer ISA')}; this CPU lacks "
                    f"{', '.join(missing)}")
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext) -> TorchRunner:
        import torch

        from mlflow_chimera.reference import validate_archive

        path = listed_file(variant, variant_dir, PACKAGE_FILE)
        validate_archive(path, what="AOTInductor package", native_code=True)
        # AOTI_RUNTIME_CHECK_INPUTS stays off: its recorded batch range is [2, …] even where the
        # size-oblivious code is correct at batch 1 (parity checks batch 1). Inputs reach the
        # package only after runtime.ChimeraModel checked dtype, rank, every non-batch
        # dimension and 1 <= batch <= the reference's maximum.
        compiled = torch._inductor.aoti_load_package(str(path))
        # The AOTInductor runtime's model container is not documented as re-entrant.
        return TorchRunner(compiled, context.signature, variant.requirements.get("device", "cpu"), serialize=True)

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("torch", variant)]


_OBLIVIOUS_NOTE = ("compiled with torch.fx.experimental._config.backed_size_oblivious=True: without "
                   "it Inductor guarded the batch to >= 2 (the example's batch) for convolutions")


@contextlib.contextmanager
def _size_oblivious():
    """Compile without assuming the batch is never 1 (torch's '0/1 specialisation').

    The FX graph cache is off meanwhile: its key does not include this switch, so a graph
    compiled earlier without it would be served from the cache, guard and all."""
    import torch

    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:  # a torch without the switch: compile as is; parity checks batch 1
        yield
        return
    with fx_config.patch(backed_size_oblivious=True), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def _reexport_on_cuda(context: BuildContext):
    """The reference program moved to the GPU and exported again with the same dynamic batch."""
    import torch

    from mlflow_chimera.reference import MAX_BATCH

    module = context.program.module().to("cuda")
    names = context.signature.input_names
    # Batch 1 would be specialised to a constant: export with at least two rows.
    tensors = {n: torch.from_numpy(a if a.shape[0] > 1 else a.repeat(2, axis=0)).to("cuda")
               for n, a in context.example.items()}
    args, kwargs = context.signature.split_call(tensors)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(module, args, kwargs, dynamic_shapes={n: {0: batch} for n in names})
