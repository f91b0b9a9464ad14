"""What runs inside the build's child processes.

* :func:`run_job`: build → load → parity → ``variant.json``, one variant per process.
* :func:`run_timing`: after every build, one process loads the variants that passed parity
  and times them interleaved (``compile/timing.py``), so their figures compare like with like.

The parent (``compile/isolation.py``) never loads a freshly built variant itself: a compiler or
runtime that crashes, hangs or exhausts memory takes down only a child.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mlflow_chimera.backends.base import BuildContext, LoadContext, VariantPlan
from mlflow_chimera.manifest import (
    BUILD_FAILED,
    FAILED_PARITY,
    READY,
    Variant,
    digest_tree,
)


@dataclass
class BuildJob:
    """Everything a child needs; plain data so it crosses the process boundary."""

    plan: VariantPlan
    backend: str  # registry name or "module:Class"
    out_dir: str
    model_dir: str
    program_path: str
    reference_sha256: str
    signature: dict
    checks_dir: str  # <case label>.npz: inputs ("in/<name>") and reference outputs ("out/<i>")
    parity_cases: list  # [{"label", "batch"}] (compile.parity.check_cases)
    tolerance: dict
    criterion: str
    scratch_dir: str
    host: dict  # parent's fingerprint, as recorded in provenance
    host_class: str
    example_batch: int
    build_threads: int = 0  # torch threads while compiling (parallel builds); 0 = default

    @classmethod
    def from_dict(cls, d: dict) -> "BuildJob":
        return cls(**{**d, "plan": VariantPlan(**d["plan"])})


def check_file(checks_dir, label: str) -> Path:
    return Path(checks_dir, f"{label}.npz")


def save_checks(checks_dir, label: str, inputs: dict, outputs: list) -> None:
    arrays = {f"in/{k}": v for k, v in inputs.items()}
    arrays.update({f"out/{i}": v for i, v in enumerate(outputs)})
    np.savez(check_file(checks_dir, label), **arrays)


def load_checks(checks_dir, label: str) -> tuple[dict, list]:
    with np.load(check_file(checks_dir, label), allow_pickle=False) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in/")}
        outs = sorted((int(k[4:]), data[k]) for k in data.files if k.startswith("out/"))
    return inputs, [v for _, v in outs]


def run_job(job: BuildJob) -> Variant:
    """Build, load and check one variant; write and return its record."""
    from mlflow_chimera import backends as backend_registry
    from mlflow_chimera.compile.parity import run_parity
    from mlflow_chimera.reference import Signature

    plan, out_dir = job.plan, Path(job.out_dir)
    signature = Signature.from_dict(job.signature)
    backend = backend_registry.for_build(job.backend)
    variant = Variant(id=plan.id, backend=plan.backend, precision=plan.precision,
                      target=plan.target, options=plan.options)
    provenance = {"reference_sha256": job.reference_sha256, "build_host": job.host,
                  "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    example, _ = load_checks(job.checks_dir, "example")
    started = time.perf_counter()
    program = preloaded_program(job.program_path, job.reference_sha256)
    context = BuildContext(program=program, program_path=Path(job.program_path), signature=signature,
                           example=example, scratch_dir=Path(job.scratch_dir))
    try:
        with _torch_threads(job.build_threads):
            output = backend.build(plan, out_dir, context)
    except Exception as exc:  # noqa: BLE001 - recorded; a failed build fails only its variant
        variant.status, variant.reason = BUILD_FAILED, f"{type(exc).__name__}: {exc}"[:1000]
        variant.provenance = {**provenance, "build_seconds": round(time.perf_counter() - started, 3)}
        variant.save(out_dir)
        return variant
    variant.provenance = {**output.provenance, **provenance,
                          "build_seconds": round(time.perf_counter() - started, 3)}
    variant.requirements = output.requirements
    variant.files = digest_tree(out_dir)
    variant.provenance["size_bytes"] = sum(Path(out_dir, rel).stat().st_size for rel in variant.files)
    load_context = LoadContext(model_dir=Path(job.model_dir), signature=signature,
                               reference_sha256=job.reference_sha256,
                               reference_file=Path(job.program_path))
    load_started = time.perf_counter()
    try:
        runner = backend.load(variant, out_dir, load_context)
    except Exception as exc:  # noqa: BLE001
        variant.status = BUILD_FAILED
        variant.reason = f"built, but failed to load: {type(exc).__name__}: {exc}"[:1000]
        variant.save(out_dir)
        return variant
    variant.provenance["load_seconds"] = round(time.perf_counter() - load_started, 3)

    cases = ((c["label"], c["batch"], *load_checks(job.checks_dir, c["label"])) for c in job.parity_cases)
    variant.parity = run_parity(runner, cases, signature.output_names, job.tolerance, job.criterion)
    variant.status = READY if variant.parity.passed else FAILED_PARITY
    variant.reason = None if variant.parity.passed else variant.parity.reason

    variant.save(out_dir)
    return variant


# The reference program the build server loaded before forking this child (see
# buildserver.py): {(path, sha256): ExportedProgram}. Children of one log_model share it
# instead of each reloading it (1.5 s for a small model).
_PROGRAMS: dict = {}


def preload_program(path: str, sha256: str) -> None:
    """Load (and verify) the reference program once in the build server, for its children."""
    from mlflow_chimera.reference import load_program

    if (path, sha256) not in _PROGRAMS:
        _PROGRAMS.clear()
        _PROGRAMS[(path, sha256)] = load_program(path, sha256)


def preloaded_program(path: str, sha256: str):
    """The program the build server preloaded, else loaded (and verified) here."""
    from mlflow_chimera.reference import load_program

    program = _PROGRAMS.get((path, sha256))
    return program if program is not None else load_program(path, sha256)


@dataclass
class TimingJob:
    """The variants to time side by side (``[[variant dir, backend registry name or
    "module:Class"]]``), the checks whose inputs are timed (one per batch size), and where the
    result goes."""

    variants: list
    model_dir: str
    program_path: str
    reference_sha256: str
    signature: dict
    checks_dir: str
    bench_cases: list
    timing: dict
    host_class: str
    result_path: str

    @classmethod
    def from_dict(cls, d: dict) -> "TimingJob":
        return cls(**d)


def run_timing(job: TimingJob) -> dict:
    """Load every listed variant in this one process, time them interleaved at each batch size
    with the thread counts pinned, and write ``{"threads", "measured_at", "latency_ms": {id:
    {batch: figures}}, "errors": {id: why}}`` to ``job.result_path``."""
    from mlflow_chimera import backends as backend_registry
    from mlflow_chimera.compile.timing import TimingConfig, measure_interleaved, pin_threads
    from mlflow_chimera.reference import Signature

    threads = pin_threads()
    context = LoadContext(model_dir=Path(job.model_dir), signature=Signature.from_dict(job.signature),
                          reference_sha256=job.reference_sha256, reference_file=Path(job.program_path))
    runners, errors = {}, {}
    for out_dir, backend in job.variants:
        variant = Variant.load(out_dir)
        try:
            runners[variant.id] = backend_registry.for_build(backend).load(variant, Path(out_dir), context)
        except Exception as exc:  # noqa: BLE001 - it loaded in its build process; record why not now
            errors[variant.id] = f"failed to load for timing: {type(exc).__name__}: {exc}"[:500]
    calls = {}
    for label in job.bench_cases:
        inputs, _ = load_checks(job.checks_dir, label)
        batch = str(next(iter(inputs.values())).shape[0])
        for vid, runner in runners.items():
            calls[(vid, batch)] = lambda run=runner.run, x=inputs: run(x)
    figures = measure_interleaved(calls, TimingConfig(**job.timing)) if calls else {}
    latency = {vid: {} for vid in runners}
    for (vid, batch), stats in figures.items():
        latency[vid][batch] = stats
    result = {"threads": threads, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "latency_ms": latency, "errors": errors}
    Path(job.result_path).write_text(json.dumps(result), encoding="utf-8")
    return result


@contextmanager
def _torch_threads(n: int):
    """Limit torch's intra-op threads while compiling, when several builds share the host."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
