"""The build pipeline: plan → build → verify parity → benchmark → record, per variant.

A variant whose build raises is recorded as ``build_failed`` with the error; one that fails
parity is recorded as ``failed_parity`` with its measured error. Neither stops the others.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mlflow_chimera import backends as backend_registry
from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.base import BuildContext, LoadContext
from mlflow_chimera.compile.parity import make_inputs, run_parity
from mlflow_chimera.compile.timing import TimingConfig, measure
from mlflow_chimera.manifest import (
    BUILD_FAILED,
    FAILED_PARITY,
    READY,
    Benchmark,
    Variant,
    digest_tree,
    variant_dir,
)

_logger = logging.getLogger("mlflow.chimera")

DEFAULT_PRECISIONS = ("fp32", "int8")
KNOWN_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def check_request(backends=None, precisions=None) -> None:
    """Fail fast, before anything is logged, on a backend or precision that cannot be built."""
    resolve_backends(backends)
    unknown = [p for p in (precisions or ()) if p not in KNOWN_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; known: {', '.join(KNOWN_PRECISIONS)}")


def resolve_backends(requested) -> tuple[list, dict]:
    """(backends to build, {backend: why it is skipped}). ``None`` means every backend this
    host can build; a backend asked for by name that cannot be built here is an error."""
    names = list(requested) if requested else backend_registry.names()
    chosen, skipped = [], {}
    for name in names:
        backend = backend_registry.get(name)
        reason = backend.build_unavailable_reason()
        if reason is None:
            chosen.append(backend)
        elif requested:
            raise ValueError(f"backend {name!r} cannot be built on this host: {reason}")
        else:
            skipped[name] = reason
    return chosen, skipped


def build_variants(
    *,
    model_dir: Path,
    program,
    program_path: Path,
    reference_sha256: str,
    signature,
    example: dict,
    reference_fn,
    backends=None,
    precisions=None,
    tolerances: dict | None = None,
    benchmark: dict | None = None,
    progress=None,
) -> tuple[list, dict]:
    """Build, check and time every planned variant into ``model_dir/variants``.

    ``reference_fn({name: ndarray}) -> [ndarray]`` gives the outputs every variant is checked
    against. Returns ``(variants, skipped_backends)``.
    """
    host = host_mod.fingerprint()
    chosen, skipped = resolve_backends(backends)
    precisions = list(precisions or DEFAULT_PRECISIONS)
    timing = TimingConfig.from_options(benchmark)
    example_batch = next(iter(example.values())).shape[0]
    bench_batches = sorted({1, example_batch})
    bench_inputs = {b: make_inputs(example, b) for b in bench_batches}
    load_context = LoadContext(model_dir=model_dir, signature=signature, reference_sha256=reference_sha256)
    variants = []
    with tempfile.TemporaryDirectory(prefix="chimera-build-") as scratch:
        context = BuildContext(program=program, program_path=program_path, signature=signature,
                               example=example, scratch_dir=Path(scratch))
        for backend in chosen:
            for plan in backend.plan(precisions, host):
                if progress:
                    progress(f"building {plan.id}")
                variant = _build_one(backend, plan, model_dir, context, load_context, host,
                                     reference_sha256, reference_fn, tolerances, timing, bench_inputs)
                _logger.info("chimera: %s -> %s%s", plan.id, variant.status,
                             f" ({variant.reason})" if variant.reason else "")
                variants.append(variant)
    return variants, skipped


def _build_one(backend, plan, model_dir, context, load_context, host, reference_sha256,
               reference_fn, tolerances, timing, bench_inputs) -> Variant:
    out_dir = variant_dir(model_dir, plan.id)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    variant = Variant(id=plan.id, backend=plan.backend, precision=plan.precision,
                      target=plan.target, options=plan.options)
    started = time.perf_counter()
    provenance = {
        "reference_sha256": reference_sha256,
        "build_host": host.to_dict(),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        output = backend.build(plan, out_dir, context)
    except Exception as exc:  # noqa: BLE001 - a failed build fails only its own variant
        variant.status, variant.reason = BUILD_FAILED, f"{type(exc).__name__}: {exc}"[:1000]
        variant.provenance = {**provenance, "build_seconds": round(time.perf_counter() - started, 3)}
        variant.save(out_dir)
        return variant
    variant.provenance = {**output.provenance, **provenance,
                          "build_seconds": round(time.perf_counter() - started, 3)}
    variant.requirements = output.requirements
    variant.files = digest_tree(out_dir)
    try:
        runner = backend.load(variant, out_dir, load_context)
    except Exception as exc:  # noqa: BLE001
        variant.status, variant.reason = BUILD_FAILED, f"built but failed to load: {type(exc).__name__}: {exc}"[:1000]
        variant.save(out_dir)
        return variant
    variant.parity = run_parity(runner, reference_fn, context.example,
                                context.signature.output_names, plan.precision, tolerances)
    if variant.parity.passed:
        variant.status = READY
    else:
        variant.status, variant.reason = FAILED_PARITY, variant.parity.reason
    if "error" not in (variant.parity.checks[-1] if variant.parity.checks else {}):
        variant.benchmarks = [_benchmark(runner, bench_inputs, timing, host)]
    variant.save(out_dir)
    return variant


def _benchmark(runner, bench_inputs: dict, timing: TimingConfig, host) -> Benchmark:
    latency = {}
    for batch, inputs in bench_inputs.items():
        latency[str(batch)] = measure(lambda: runner.run(inputs), timing)
    return Benchmark(
        host_class=host.host_class,
        latency_ms=latency,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool="log_model",
    )
