"""What runs inside a build's child process: build → load → parity → benchmark → variant.json.

The parent (``compile/isolation.py``) never loads a freshly built variant itself: a compiler or
runtime that crashes, hangs or exhausts memory takes down only this process. The parent hands
over a :class:`BuildJob`; the child writes ``variant.json`` into the variant directory.
"""

from __future__ import annotations

import fcntl
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
    Benchmark,
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
    bench_cases: list  # labels of the cases timed, one per batch size
    tolerance: dict
    criterion: str
    timing: dict
    scratch_dir: str
    bench_lock: str
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


@contextmanager
def exclusive(lock_path: str):
    """Only one process at a time measures latency, even when builds run in parallel."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_job(job: BuildJob) -> Variant:
    """Build, check and time one variant; write and return its record."""
    from mlflow_chimera import backends as backend_registry
    from mlflow_chimera.compile.parity import run_parity
    from mlflow_chimera.compile.timing import TimingConfig, measure
    from mlflow_chimera.reference import Signature, load_program

    plan, out_dir = job.plan, Path(job.out_dir)
    signature = Signature.from_dict(job.signature)
    backend = backend_registry.for_build(job.backend)
    variant = Variant(id=plan.id, backend=plan.backend, precision=plan.precision,
                      target=plan.target, options=plan.options)
    provenance = {"reference_sha256": job.reference_sha256, "build_host": job.host,
                  "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    example, _ = load_checks(job.checks_dir, "example")
    started = time.perf_counter()
    program = load_program(job.program_path, job.reference_sha256)
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

    if "error" not in variant.parity.checks[-1]:
        timing = TimingConfig(**job.timing)
        latency = {}
        with exclusive(job.bench_lock):
            for label in job.bench_cases:
                inputs, _ = load_checks(job.checks_dir, label)
                batch = next(iter(inputs.values())).shape[0]
                latency[str(batch)] = measure(lambda: runner.run(inputs), timing)
        variant.benchmarks = [Benchmark(job.host_class, latency,
                                        datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        tool="log_model")]
    variant.save(out_dir)
    return variant


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
