"""Host fingerprint: what this machine is, computed without importing torch.

The fingerprint answers two questions for selection:

* *can this variant run here?* — OS, CPU architecture and instruction sets, GPUs, and the
  versions of the runtime libraries that are installed;
* *were these timings measured on a machine like this one?* — the **host class**, a short
  readable key (``linux-x86_64-intel-xeon-processor-2cpu``) under which benchmarks are stored.
  Timings are only ever compared within one host class.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

# Instruction-set flags that decide which compiled CPU code can run. Order is from the most
# basic to the most specialised; ``isa_level`` reports the highest one present.
_X86_ISA_LEVELS = ("sse4_2", "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
_INTERESTING_FLAGS = set(_X86_ISA_LEVELS) | {
    "fma", "f16c", "avx512bw", "avx512vl", "avx512dq", "avx_vnni", "avx512_fp16", "amx_bf16",
    "amx_int8", "neon", "asimd", "sve", "sve2", "bf16", "i8mm",
}
_RUNTIME_PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "mlflow", "numpy")


@dataclass(frozen=True)
class GPU:
    name: str
    compute_capability: str  # "9.0"
    memory_mib: int


@dataclass(frozen=True)
class HostFingerprint:
    """What a host is. Plain data: it is stored in provenance and compared by selection."""

    os: str
    arch: str
    cpu_model: str
    cpu_count: int
    isa: tuple[str, ...]
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    driver: str | None = None
    packages: dict = field(default_factory=dict)

    @property
    def isa_level(self) -> str:
        present = [f for f in _X86_ISA_LEVELS if f in self.isa]
        return present[-1] if present else (self.arch if self.arch != "x86_64" else "baseline")

    @property
    def host_class(self) -> str:
        """Readable key that groups machines whose timings are comparable."""
        parts = [self.os, self.arch, _slug(self.cpu_model), f"{self.cpu_count}cpu"]
        parts += [_slug(g.name) for g in self.gpus[:1]]
        if len(self.gpus) > 1:
            parts.append(f"x{len(self.gpus)}")
        return "-".join(p for p in parts if p)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isa"] = list(self.isa)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["host_class"] = self.host_class
        d["isa_level"] = self.isa_level
        return d


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|core|with|radeon graphics)\b", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def _read_cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags and model != platform.machine():
                    break
    except OSError:
        pass
    return model, flags


def _nvidia_gpus() -> tuple[tuple[GPU, ...], str | None]:
    """GPUs through ``nvidia-smi`` (present wherever the NVIDIA driver is); never imports torch."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return (), None
    query = "--query-gpu=name,compute_cap,memory.total,driver_version"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return (), None
    gpus, driver = [], None
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4:
            name, cc, mem, driver = fields
            gpus.append(GPU(name=name, compute_capability=cc, memory_mib=int(float(mem))))
    return tuple(gpus), driver


def installed_version(package: str) -> str | None:
    """Version of an installed distribution, read from metadata (the package is not imported)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def fingerprint() -> HostFingerprint:
    """This host's fingerprint (computed once per process)."""
    model, flags = _read_cpuinfo()
    gpus, driver = _nvidia_gpus() if os.environ.get("CHIMERA_IGNORE_GPUS") != "1" else ((), None)
    packages = {p: v for p in _RUNTIME_PACKAGES if (v := installed_version(p))}
    return HostFingerprint(
        os=platform.system().lower(),
        arch=platform.machine().lower(),
        cpu_model=model,
        cpu_count=os.cpu_count() or 1,
        isa=tuple(sorted(flags & _INTERESTING_FLAGS)),
        gpus=gpus,
        driver=driver,
        packages=packages,
    )
