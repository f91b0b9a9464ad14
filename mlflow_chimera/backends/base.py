"""The one small protocol every backend implements.

A backend has one job: given the reference program and options, produce files and provenance
(``plan`` + ``build``); given a variant directory on a compatible host, return a runner
(``incompatibility`` + ``load``). It never decides selection, never writes MLmodel and never
talks to the tracking server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class VariantPlan:
    """A variant to build: identity and build options, before any file exists."""

    id: str
    backend: str
    precision: str
    target: str
    options: dict = field(default_factory=dict)


@dataclass
class BuildContext:
    """What a build gets: the reference (in memory and on disk), the example, and a scratch
    directory shared by the builds of one log_model call, where a backend may keep work that
    later plans reuse (e.g. the fp32 ONNX export that int8 quantises). Builds of one backend
    run one after another; each runs in its own process."""

    program: object  # torch.export.ExportedProgram
    program_path: Path
    signature: object  # reference.Signature
    example: dict  # {name: ndarray}
    scratch_dir: Path


@dataclass
class BuildOutput:
    provenance: dict
    requirements: dict


@dataclass
class LoadContext:
    """What a loader gets besides the variant directory. ``reference_path()`` gives the
    reference program, fetched (and verified) only when a backend needs it."""

    model_dir: Path
    signature: object  # reference.Signature
    reference_sha256: str
    reference_uri: str | None = None  # where the program lives when not in model_dir
    reference_file: Path | None = None  # a local copy already at hand (builds)
    reference_size: int | None = None  # bytes, as recorded: checked against the cache's free space

    def reference_path(self) -> Path:
        from mlflow_chimera.manifest import REFERENCE_PROGRAM

        if self.reference_file is not None:
            return Path(self.reference_file)
        local = Path(self.model_dir, REFERENCE_PROGRAM)
        if local.is_file() or not self.reference_uri:
            return local
        from mlflow_chimera.cache import fetch_file

        return fetch_file(self.reference_uri, self.reference_sha256, local.name, size=self.reference_size)


class Runner(Protocol):
    """A loaded variant. ``run`` must be safe to call from several threads at once."""

    def run(self, inputs: dict) -> list:  # {name: ndarray} -> [ndarray] in output order
        ...


class Backend(Protocol):
    name: str
    needs_torch_at_runtime: bool

    def build_unavailable_reason(self) -> str | None:
        """Why this host cannot build this backend's variants, or None if it can."""

    def plan(self, precisions: list, host) -> list:
        """The variants this backend would build here for the requested precisions."""

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        """Write the variant's files into ``out_dir``; return provenance and requirements."""

    def incompatibility(self, variant, host) -> str | None:
        """Why ``variant`` cannot run on ``host``, or None if it can."""

    def load(self, variant, variant_dir: Path, context: LoadContext) -> Runner:
        """A runner for a verified variant directory."""

    def pip_requirements(self, variant) -> list:
        """pip requirements a serving environment needs to run ``variant``."""


def listed_file(variant, variant_dir: Path, name: str) -> Path:
    """The path of ``name`` in a verified variant directory — only if the variant's record
    lists it (and so its digest was checked); a backend never opens an unlisted file."""
    from mlflow_chimera.manifest import IntegrityError, confined

    if name not in variant.files:
        raise IntegrityError(f"{variant.id}: its record does not list {name}; an unlisted file is never opened")
    return confined(variant_dir, name)


def major_minor(version: str) -> str:
    """"2.13.0+cpu" -> "2.13"."""
    return ".".join(version.split("+")[0].split(".")[:2])


def pin_requirement(package: str, variant=None) -> str:
    """``package==<version>`` without a local label (``torch==2.13.0``): the version that
    built ``variant`` (its build host's packages, in its provenance), else the installed one."""
    from mlflow_chimera.host import installed_version

    build_host = (variant.provenance or {}).get("build_host") if variant is not None else None
    built = (build_host or {}).get("packages") or {}
    version = built.get(package) or installed_version(package)
    return f"{package}=={version.split('+')[0]}" if version else package


def version_tuple(version: str) -> tuple:
    """"1.20.1" -> (1, 20, 1); "2026.4.1-22982-e213a14" -> (2026, 4, 1): the leading digits of
    the first three parts, for comparing runtime versions."""
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d*", part).group()
        out.append(int(digits) if digits else 0)
    return tuple(out)
