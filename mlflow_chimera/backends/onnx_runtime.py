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
    major_minor,
    pin_requirement,
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


class OnnxRuntimeBackend:
    name = "onnxruntime"
    needs_torch_at_runtime = False

    def build_unavailable_reason(self) -> str | None:
        from mlflow_chimera.host import installed_version

        missing = [p for p in ("onnxruntime", "onnx", "onnxscript") if not installed_version(p)]
        return f"missing {', '.join(missing)}" if missing else None

    def plan(self, precisions: list, host) -> list:
        plans = []
        for precision, level, suffix in _FLAVOURS:
            if precision in precisions:
                plans.append(VariantPlan(
                    id=f"onnxruntime-{precision}-cpu{suffix}",
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
                    },
                ))
        return plans

    # -- build -----------------------------------------------------------------------------

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import onnx
        import onnxruntime

        fp32_path, export_provenance = self._export_fp32(context)
        target = Path(out_dir, MODEL_FILE)
        provenance = dict(export_provenance)
        if plan.precision == "int8":
            provenance.update(_quantize_dynamic(fp32_path, target))
        else:
            target.write_bytes(fp32_path.read_bytes())
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

    def _export_fp32(self, context: BuildContext) -> tuple[Path, dict]:
        """Export the reference program to ONNX once per log_model; later plans (run after this
        one, in other processes) reuse the file and its provenance from the scratch directory."""
        folder = Path(context.scratch_dir, "onnx-fp32")
        path, record = folder / MODEL_FILE, folder / "export.json"
        if record.is_file():
            return path, json.loads(record.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        provenance = _export(context, path)
        record.write_text(json.dumps(provenance))
        return path, provenance

    # -- run -------------------------------------------------------------------------------

    def incompatibility(self, variant, host) -> str | None:
        installed = host.packages.get("onnxruntime") or host.packages.get("onnxruntime-gpu")
        if not installed:
            return "onnxruntime is not installed on this host"
        built_with = variant.requirements.get("packages", {}).get("onnxruntime")
        if built_with and _version_tuple(installed) < _version_tuple(built_with):
            return (f"onnxruntime {installed} is older than {built_with}, which built and "
                    f"validated this variant (opset {variant.provenance.get('opset')})")
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext) -> OnnxRuntimeRunner:
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
        session = onnxruntime.InferenceSession(
            str(Path(variant_dir, MODEL_FILE)), sess_options=opts, providers=providers
        )
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
        return OnnxRuntimeRunner(session)

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("onnxruntime")]


def _version_tuple(version: str) -> tuple:
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _export(context: BuildContext, path: Path) -> dict:
    """ONNX export with the dynamo exporter; the legacy TorchScript exporter where it fails.
    Returns provenance saying which exporter produced the file and why."""
    import torch

    signature = context.signature
    args, kwargs = signature.split_call(
        {n: torch.from_numpy(a) for n, a in context.example.items()}
    )
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
            TraceableProgram(context.program.module()), args, str(path), kwargs=kwargs, dynamo=False,
            dynamic_axes={n: {0: "batch"} for n in signature.input_names + signature.output_names},
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
