"""The build pipeline: plan → build → verify parity → benchmark → record, per variant.

The parent process plans the variants and computes the reference outputs every variant is
checked against; each variant is then built, checked and timed in a child process
(``compile/isolation.py``). A variant whose build fails, crashes or times out is recorded as
``build_failed`` with the reason; one that fails parity as ``failed_parity`` with its measured
error. Neither stops the others.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from mlflow_chimera import backends as backend_registry
from mlflow_chimera import host as host_mod
from mlflow_chimera.compile import isolation
from mlflow_chimera.compile.parity import case_inputs, check_cases, criterion_for, tolerance_for
from mlflow_chimera.compile.timing import TimingConfig
from mlflow_chimera.compile.worker import BuildJob, TimingJob, save_checks
from mlflow_chimera.manifest import FAILED_PARITY, READY, Benchmark, variant_dir

_logger = logging.getLogger("mlflow.chimera")

# bf16 is built only by backends that have it, and only where the CPU runs it natively.
DEFAULT_PRECISIONS = ("fp32", "bf16", "int8")
KNOWN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def check_request(backends=None, precisions=None) -> None:
    """Fail fast, before anything is logged, on a backend or precision that cannot be built."""
    resolve_backends(backends)
    unknown = [p for p in (precisions or ()) if p not in KNOWN_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; known: {', '.join(KNOWN_PRECISIONS)}")


def resolve_backends(requested) -> tuple[list, dict]:
    """([(name, backend)] to build, {name: why it is skipped}). ``None`` means every backend
    this host can build; a backend asked for by name that cannot be built here is an error.
    A name may also be ``"package.module:Class"`` for a backend outside this package."""
    names = list(requested) if requested else backend_registry.names()
    chosen, skipped = [], {}
    for name in names:
        backend = backend_registry.for_build(name)
        reason = backend.build_unavailable_reason()
        if reason is None:
            chosen.append((name, backend))
        elif requested:
            raise ValueError(f"backend {name!r} cannot be built on this host: {reason}")
        else:
            skipped[name] = reason
    return chosen, skipped


def _static_fallbacks(chosen, variants, precisions, host, example_batch: int, signature) -> list:
    """[(backend name, plans)] of fixed-batch variants for backends whose dynamic-batch
    variants all failed parity (an export that baked in a size from the example's batch), so
    the backend is not lost for the batch sizes users are most likely to serve (1 and the
    example's). Models with other dynamic axes are left as they are."""
    import inspect

    if signature.dynamic_axes:
        return []
    fallbacks = []
    for name, backend in chosen:
        if "static_batches" not in inspect.signature(backend.plan).parameters:
            continue
        own = [v for v in variants if v.backend == backend.name and not v.id.endswith("-static")]
        failed = [v for v in own if v.status == FAILED_PARITY]
        if failed and not any(v.status == READY and v.precision == "fp32" for v in own):
            plans = backend.plan(precisions, host, static_batches=sorted({1, example_batch}))
            for plan in plans:
                plan.options["static_fallback_reason"] = f"{failed[0].id}: {failed[0].reason}"[:300]
            _logger.warning("chimera: every dynamic-batch %s variant failed parity (%s); building it at fixed "
                            "batch sizes %s", backend.name, failed[0].reason, sorted({1, example_batch}))
            fallbacks.append((name, plans))
    return fallbacks


def _time_side_by_side(ready: list, backend_specs: dict, job: TimingJob, timeout_s: float) -> None:
    """Time the variants that passed parity in one child process, interleaved (see
    ``worker.run_timing``), and record the figures in each one's ``variant.json``. If that
    process dies, the variants keep no figures and selection falls back to the default order."""
    if not ready:
        return
    job.variants = [[str(variant_dir(job.model_dir, v.id)), backend_specs.get(v.backend, v.backend)] for v in ready]
    _logger.info("chimera: timing %d variant(s) side by side at batch sizes %s", len(ready),
                 ", ".join(c.replace("batch_", "") for c in job.bench_cases))
    result, error = isolation.run_timing(job, timeout_s=timeout_s)
    if result is None:
        _logger.warning("chimera: no variant was timed: %s", error)
    for variant in ready:
        latency = (result or {}).get("latency_ms", {}).get(variant.id)
        if latency:
            variant.benchmarks = [Benchmark(job.host_class, latency, result["measured_at"], tool="log_model",
                                            threads=result["threads"], method="interleaved")]
        else:
            variant.provenance["timing_error"] = (result or {}).get("errors", {}).get(variant.id) or error
        variant.save(variant_dir(job.model_dir, variant.id))


def build_variants(
    *,
    model_dir: Path,
    program_path: Path,
    reference_sha256: str,
    signature,
    example: dict,
    reference_fn,
    backends=None,
    precisions=None,
    tolerances: dict | None = None,
    benchmark: dict | None = None,
    build_timeout: float | None = None,
    parallelism: int | None = None,
    progress=None,
    skip_ids=(),
) -> tuple[list, dict]:
    """Build, check and time every planned variant (except ``skip_ids``) into
    ``model_dir/variants``.

    ``reference_fn({name: ndarray}) -> [ndarray]`` gives the outputs every variant is checked
    against. Returns ``(variants, skipped_backends)``.
    """
    host = host_mod.fingerprint()
    chosen, skipped = resolve_backends(backends)
    precisions = list(precisions or DEFAULT_PRECISIONS)
    timing = dataclasses.asdict(TimingConfig.from_options(benchmark))
    example_batch = next(iter(example.values())).shape[0]
    cases = check_cases(example_batch, signature.dynamic_axes)
    parallelism = parallelism or isolation.default_parallelism()
    with tempfile.TemporaryDirectory(prefix="chimera-build-") as scratch:
        checks_dir = Path(scratch, "checks")
        checks_dir.mkdir()
        for case in cases:
            inputs = case_inputs(example, case, signature.dynamic_axes)
            save_checks(checks_dir, case["label"], inputs, reference_fn(inputs))
        common = dict(
            model_dir=str(model_dir), program_path=str(program_path),
            reference_sha256=reference_sha256, signature=signature.to_dict(),
            checks_dir=str(checks_dir), parity_cases=cases, example_batch=example_batch,
            scratch_dir=scratch, host=host.to_dict(), host_class=host.host_class,
            build_threads=0 if parallelism == 1 else max(1, (host.cpu_count or 1) // parallelism),
        )
        def jobs(name, plans):
            return [BuildJob(plan=plan, backend=name, out_dir=str(variant_dir(model_dir, plan.id)),
                             tolerance=tolerance_for(plan.precision, tolerances),
                             criterion=criterion_for(plan.precision), **common)
                    for plan in plans if plan.id not in skip_ids]

        def run(groups):
            return isolation.run_groups(groups, timeout_s=build_timeout or isolation.DEFAULT_TIMEOUT_S,
                                        parallelism=parallelism, progress=progress)

        variants = run([jobs(name, backend.plan(precisions, host)) for name, backend in chosen])
        fallback = [jobs(name, plans) for name, plans in
                    _static_fallbacks(chosen, variants, precisions, host, example_batch, signature)]
        if any(fallback):
            variants += run(fallback)
        _time_side_by_side(
            [v for v in variants if v.status == READY],
            {backend.name: name for name, backend in chosen},
            TimingJob(variants=[], model_dir=str(model_dir), program_path=str(program_path),
                      reference_sha256=reference_sha256, signature=signature.to_dict(),
                      checks_dir=str(checks_dir),
                      bench_cases=["batch_1"] + (["example"] if example_batch != 1 else []),
                      timing=timing, host_class=host.host_class,
                      result_path=str(Path(scratch, "timing.json"))),
            timeout_s=build_timeout or isolation.DEFAULT_TIMEOUT_S,
        )
    return variants, skipped
