"""ONNX Runtime variants: fp32 (exported from the reference program) and int8 (dynamic
quantisation of the fp32 model), each with the session options it is measured with.

Session options are part of the variant: graph optimisation helps convolutions and can hurt
transformer encoders (see BASELINES.md), so fp32 is built twice — all graph optimisations,
and none (``-noopt``) — and selection ranks them by measurement. Optimisation happens when
the session is created, never saved to disk, so no variant file is hardware-bound.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

from mlflow_chimera.backends.base import (
    BuildContext,
    BuildOutput,
    LoadContext,
    VariantPlan,
    listed_file,
    major_minor,
    pin_requirement,
    version_tuple,
)

_logger = logging.getLogger("mlflow.chimera")

MODEL_FILE = "model.onnx"
CPU_PROVIDER = "CPUExecutionProvider"
_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# (precision, graph optimisation level, id suffix)
_FLAVOURS = (("fp32", "all", ""), ("fp32", "disabled", "-noopt"), ("int8", "all", ""))


class OnnxRuntimeRunner:
    def __init__(self, session):
        self.session = session
        self._run = session.run  # InferenceSession.run is thread-safe

    def run(self, inputs: dict) -> list:
        return self._run(None, inputs)


class StaticBatchRunner:
    """Graphs exported at fixed batch sizes: a batch runs on the graph of its size, or in chunks
    of the largest sizes that fit (batch 1 is always among them)."""

    def __init__(self, sessions: dict):
        self._runs = {batch: session.run for batch, session in sessions.items()}
        self._sizes = sorted(self._runs, reverse=True)

    def run(self, inputs: dict) -> list:
        import numpy as np

        total = next(iter(inputs.values())).shape[0]
        if total in self._runs:
            return self._runs[total](None, inputs)
        parts, start = [], 0
        while start < total:
            size = next(s for s in self._sizes if s <= total - start)
            parts.append(self._runs[size](None, {k: v[start:start + size] for k, v in inputs.items()}))
            start += size
        return [np.concatenate(outputs) for outputs in zip(*parts)]


def model_files(options: dict) -> dict:
    """{file name: fixed batch size or None} of a variant with these options."""
    batches = options.get("static_batches")
    return {f"model_b{b}.onnx": int(b) for b in batches} if batches else {MODEL_FILE: None}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    needs_torch_at_runtime = False

    def build_unavailable_reason(self) -> str | None:
        from mlflow_chimera.host import installed_version

        missing = [p for p in ("onnxruntime", "onnx", "onnxscript") if not installed_version(p)]
        return f"missing {', '.join(missing)}" if missing else None

    def plan(self, precisions: list, host, static_batches: list | None = None) -> list:
        """The variants to build; with ``static_batches``, the fallback that fixes the batch at
        each of those sizes (``-static``: one graph per size, larger batches run in chunks)."""
        plans = []
        for precision, level, suffix in _FLAVOURS:
            if precision in precisions:
                options = {"static_batches": list(static_batches)} if static_batches else {}
                plans.append(VariantPlan(
                    id=f"onnxruntime-{precision}-cpu{suffix}" + ("-static" if static_batches else ""),
                    backend=self.name,
                    precision=precision,
                    target="cpu",
                    options={
                        "providers": [CPU_PROVIDER],
                        "session_options": {
                            "graph_optimization_level": level,
                            "intra_op_num_threads": 0,  # 0: ONNX Runtime's default (physical cores)
                            "inter_op_num_threads": 1,
                            "execution_mode": "sequential",
                        },
                        **options,
                    },
                ))
        return plans

    # -- build -----------------------------------------------------------------------------

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import onnx
        import onnxruntime

        provenance = {}
        for name, batch in model_files(plan.options).items():
            fp32_path, export_provenance = self._export_fp32(context, batch)
            target = Path(out_dir, name)
            provenance.update(export_provenance)
            if plan.precision == "int8":
                provenance.update(_quantize_dynamic(fp32_path, target))
            else:
                target.write_bytes(fp32_path.read_bytes())
        if plan.options.get("static_batches"):
            provenance["static_batches"] = plan.options["static_batches"]
        model = onnx.load(str(target), load_external_data=False)
        provenance["opset"] = {op.domain or "ai.onnx": op.version for op in model.opset_import}
        provenance["onnxruntime_version"] = onnxruntime.__version__
        provenance["session_options"] = plan.options["session_options"]
        return BuildOutput(
            provenance=provenance,
            requirements={
                "device": "cpu",
                "providers": plan.options["providers"],
                "packages": {"onnxruntime": major_minor(onnxruntime.__version__)},
            },
        )

    def _export_fp32(self, context: BuildContext, batch: int | None = None) -> tuple[Path, dict]:
        """Export the reference program to ONNX once per log_model (per fixed batch size, for
        static variants); later plans (run after this one, in other processes) reuse the file
        and its provenance from the scratch directory."""
        folder = Path(context.scratch_dir, "onnx-fp32" + (f"-b{batch}" if batch else ""))
        path, record = folder / MODEL_FILE, folder / "export.json"
        if record.is_file():
            return path, json.loads(record.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        provenance = _export(context, path, batch)
        record.write_text(json.dumps(provenance))
        return path, provenance

    # -- run -------------------------------------------------------------------------------

    def incompatibility(self, variant, host) -> str | None:
        installed = host.packages.get("onnxruntime") or host.packages.get("onnxruntime-gpu")
        if not installed:
            return "onnxruntime is not installed on this host"
        built_with = variant.requirements.get("packages", {}).get("onnxruntime")
        if built_with and version_tuple(installed) < version_tuple(built_with):
            return (f"onnxruntime {installed} is older than {built_with}, which built and "
                    f"validated this variant (opset {variant.provenance.get('opset')})")
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext):
        """A runner for the verified variant: one session, or one per fixed batch size."""
        sessions = {}
        for name, batch in model_files(variant.options).items():
            model_path = listed_file(variant, variant_dir, name)
            check_precision_claim(variant.precision, model_path.read_bytes(), variant.id)
            sessions[batch] = self._session(variant, model_path, context)
        if None in sessions:
            return OnnxRuntimeRunner(sessions[None])
        return StaticBatchRunner(sessions)

    def _session(self, variant, model_path: Path, context: LoadContext):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        settings = variant.options.get("session_options", {})
        opts.graph_optimization_level = getattr(
            onnxruntime.GraphOptimizationLevel, _LEVELS[settings.get("graph_optimization_level", "all")]
        )
        opts.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
        opts.inter_op_num_threads = int(settings.get("inter_op_num_threads", 0))
        if settings.get("execution_mode") == "parallel":
            opts.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        providers = variant.options.get("providers", [CPU_PROVIDER])
        session = onnxruntime.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        active = session.get_providers()
        missing = [p for p in providers if p not in active]
        if missing:
            # A silent fall back to another provider is a failed load, not a success.
            raise RuntimeError(
                f"execution provider(s) {missing} required by {variant.id} are not active after "
                f"creating the session (active: {active})"
            )
        graph_inputs = [i.name for i in session.get_inputs()]
        expected = context.signature.input_names
        if sorted(graph_inputs) != sorted(expected):
            raise RuntimeError(f"{variant.id}: ONNX inputs {graph_inputs} do not match {expected}")
        return session

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("onnxruntime", variant)]


# Operators only a quantised graph has. Their names are stored as plain strings in the ONNX
# protobuf, so a byte search finds them without the onnx package (which serving hosts lack).
_QUANTIZED_OPS = (b"DynamicQuantizeLinear", b"QuantizeLinear", b"MatMulInteger", b"ConvInteger",
                  b"QLinearMatMul", b"QLinearConv", b"MatMulIntegerToFloat", b"DynamicQuantizeMatMul")


def check_precision_claim(precision: str, model_bytes: bytes, variant_id: str) -> None:
    """A record that claims a full-precision variant whose graph is quantised is refused: the
    precision a record claims decides the accuracy a loader promises."""
    if precision == "int8":
        return
    found = sorted({op.decode() for op in _QUANTIZED_OPS if op in model_bytes})
    if found:
        raise RuntimeError(f"{variant_id} claims {precision}, but its graph has quantisation operators "
                           f"({', '.join(found)}): it is an int8 model")


def _export(context: BuildContext, path: Path, batch: int | None = None) -> dict:
    """ONNX export with the dynamo exporter; the legacy TorchScript exporter where it fails.
    With ``batch``, the program is first exported again with every size fixed at that batch.
    Returns provenance saying which exporter produced the file and why."""
    import numpy as np
    import torch

    signature = context.signature
    example = context.example
    if batch:
        example = {n: np.ascontiguousarray(np.resize(a, (batch, *a.shape[1:]))) for n, a in example.items()}
    context_inputs = {n: torch.from_numpy(a) for n, a in example.items()}
    args, kwargs = signature.split_call(context_inputs)
    if batch:
        program = torch.export.export(context.program.module(), args, kwargs)
        context = BuildContext(program=program, program_path=context.program_path, signature=signature,
                               example=example, scratch_dir=context.scratch_dir)
    common = {"input_names": signature.input_names, "output_names": signature.output_names}
    # The exporter warns at import about torchvision ops it cannot register; not our concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                context.program, args, kwargs=kwargs, dynamo=True, verbose=False, **common
            )
        program.save(str(path))
        return {
            "compiler": "torch.onnx.export (dynamo)",
            "compiler_version": torch.__version__,
            "exporter": "dynamo",
            "export_seconds": round(time.perf_counter() - started, 3),
        }
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the other one
        first_line = (str(exc).strip().splitlines() or [""])[0]
        dynamo_error = f"{type(exc).__name__}: {first_line[:300]}"
        _logger.warning("dynamo ONNX export failed (%s); trying the legacy exporter", dynamo_error)
    from mlflow_chimera.backends.torch_modules import TraceableProgram

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TraceableProgram(context.program.module(), signature.input_names),
            tuple(context_inputs[n] for n in signature.input_names), str(path), dynamo=False,
            dynamic_axes=None if batch else {n: {0: "batch"} for n in signature.input_names + signature.output_names},
            opset_version=17, **common,
        )
    return {
        "compiler": "torch.onnx.export (legacy TorchScript)",
        "compiler_version": torch.__version__,
        "exporter": "legacy",
        "exporter_fallback_reason": dynamo_error,
        "export_seconds": round(time.perf_counter() - started, 3),
    }


def _quantize_dynamic(fp32_path: Path, target: Path) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(fp32_path), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return {
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "quantizer_version": onnxruntime.__version__,
        "quantization": {"weight_type": "QInt8", "activations": "dynamic uint8", "per_channel": False},
    }
