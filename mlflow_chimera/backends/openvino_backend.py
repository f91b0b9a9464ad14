"""OpenVINO variants (CPU): the reference program converted to OpenVINO IR (``model.xml`` +
``model.bin``), compiled by the CPU plugin when loaded.

One IR serves every precision: fp32 and bf16 differ only in the ``INFERENCE_PRECISION_HINT``
they are compiled with, which the variant records in its options. The hint is always set
explicitly — on hosts with AMX the CPU plugin defaults to bf16, so an unpinned "fp32" variant
would not be fp32. A bf16 variant needs a CPU with AVX512-BF16 or AMX. The IR itself is not
bound to a CPU architecture or instruction set.

Loading imports neither torch nor onnxruntime. Compiled blobs are kept in OpenVINO's own cache
(``<chimera cache>/openvino``, local to the host and written only by OpenVINO), keyed by the
model's content and the compile options; a CPU blob holds the transformed graph, not native code.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
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

MODEL_XML, MODEL_BIN = "model.xml", "model.bin"
DEVICE = "CPU"
_HINTS = {"fp32": "f32", "bf16": "bf16"}  # precision -> INFERENCE_PRECISION_HINT
BF16_ISA = ("avx512_bf16", "amx_bf16")  # any one of them runs bf16 natively
# The compile options a record may set; anything else (a CACHE_DIR, another device) is refused.
_RECORD_OPTIONS = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")
DIRECT_ROUTE = "ov.convert_model(ExportedProgram)"
ONNX_ROUTE = "ov.convert_model(ONNX export)"


class OpenVINORunner:
    """A compiled model with one infer request per thread: ``CompiledModel.__call__`` shares a
    single request, so concurrent calls through it would overwrite each other's tensors."""

    def __init__(self, compiled, output_indices: list):
        self.compiled = compiled
        self._indices = output_indices  # the compiled model's output index for each signature output
        self._local = threading.local()

    def run(self, inputs: dict) -> list:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # share_outputs=False copies the results out of the request's tensors, which the next
        # call on this thread reuses.
        values = request.infer(inputs, share_inputs=False, share_outputs=False).to_tuple()
        return [values[i] for i in self._indices]


def bf16_hardware(host) -> bool:
    """Whether ``host``'s fingerprint shows a CPU that runs bf16 natively."""
    return any(flag in host.isa for flag in BF16_ISA)


class OpenVINOBackend:
    name = "openvino"
    needs_torch_at_runtime = False

    def build_unavailable_reason(self) -> str | None:
        from mlflow_chimera.host import installed_version

        missing = [p for p in ("openvino", "torch") if not installed_version(p)]
        return f"missing {', '.join(missing)}" if missing else None

    def plan(self, precisions: list, host) -> list:
        """fp32 always; bf16 when asked for and this host's CPU has bf16 hardware."""
        plans = []
        for precision in ("fp32", "bf16"):
            if precision not in precisions:
                continue
            # The fingerprint alone decides, as selection does: a bf16 variant is built only
            # where this host's own loader would accept it.
            if precision == "bf16" and not bf16_hardware(host):
                _logger.info("chimera: no openvino bf16 variant: %s", _BF16_MISSING)
                continue
            plans.append(VariantPlan(
                id=f"openvino-{precision}-cpu", backend=self.name, precision=precision, target="cpu",
                options={"device": DEVICE, "config": {"INFERENCE_PRECISION_HINT": _HINTS[precision],
                                                      "PERFORMANCE_HINT": "LATENCY"}},
            ))
        return plans

    # -- build -----------------------------------------------------------------------------

    def build(self, plan: VariantPlan, out_dir: Path, context: BuildContext) -> BuildOutput:
        import openvino as ov

        source, conversion = self._convert(context)
        for name in (MODEL_XML, MODEL_BIN):
            shutil.copyfile(source / name, Path(out_dir, name))
        provenance = {
            **conversion,
            "openvino_version": ov.get_version(),
            "device": plan.options["device"],
            "compile_config": plan.options["config"],
        }
        requirements = {"device": "cpu", "packages": {"openvino": major_minor(ov.__version__)}}
        if plan.precision == "bf16":
            requirements["isa"] = list(BF16_ISA)
            provenance["isa_needed"] = f"any of {', '.join(BF16_ISA)} (native bf16)"
        return BuildOutput(provenance=provenance, requirements=requirements)

    def _convert(self, context: BuildContext) -> tuple[Path, dict]:
        """The IR (a folder holding model.xml and model.bin) and how it was made — converted
        once per log_model; later plans (in other processes) reuse it from the scratch dir."""
        folder = Path(context.scratch_dir, "openvino-ir")
        record = folder / "conversion.json"
        if record.is_file():
            return folder, json.loads(record.read_text())
        import openvino as ov

        started = time.perf_counter()
        try:
            model = ov.convert_model(context.program)
            conversion = {"compiler": DIRECT_ROUTE, "conversion": "direct"}
        except Exception as exc:  # noqa: BLE001 - any conversion failure: try the ONNX route
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            _logger.warning("OpenVINO could not convert the ExportedProgram (%s); converting the ONNX export",
                            reason)
            from mlflow_chimera.backends.onnx_runtime import OnnxRuntimeBackend

            try:
                onnx_path, export = OnnxRuntimeBackend()._export_fp32(context)  # shared with onnxruntime's
                model = ov.convert_model(str(onnx_path))
            except Exception as onnx_exc:
                raise RuntimeError(f"OpenVINO could not convert the ExportedProgram ({reason}) nor its ONNX "
                                   f"export ({type(onnx_exc).__name__}: {onnx_exc})") from onnx_exc
            conversion = {"compiler": ONNX_ROUTE, "conversion": "onnx", "conversion_fallback_reason": reason,
                          "onnx_exporter": export.get("compiler")}
        model = conform(model, context.signature, _aliases(context.program, context.signature))
        folder.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(folder / MODEL_XML), compress_to_fp16=False)
        conversion.update(compiler_version=ov.__version__.split("-")[0],  # "2026.4.1-22982-…" -> "2026.4.1"
                          convert_seconds=round(time.perf_counter() - started, 3))
        record.write_text(json.dumps(conversion))
        return folder, conversion

    # -- run -------------------------------------------------------------------------------

    def incompatibility(self, variant, host) -> str | None:
        installed = host.packages.get("openvino")
        if not installed:
            return "openvino is not installed on this host"
        built_with = variant.requirements.get("packages", {}).get("openvino")
        if built_with and version_tuple(installed) < version_tuple(built_with):
            return f"openvino {installed} is older than {built_with}, which built and validated this variant"
        if variant.precision == "bf16" and not bf16_hardware(host):
            return _BF16_MISSING
        return None

    def load(self, variant, variant_dir: Path, context: LoadContext) -> OpenVINORunner:
        """Compile the verified IR with the options its record lists (precision hint pinned)."""
        import openvino as ov

        xml = listed_file(variant, variant_dir, MODEL_XML)
        weights = listed_file(variant, variant_dir, MODEL_BIN)
        core = ov.Core()
        # From the ov.Model, not the path: the compile cache is then keyed by the model's content,
        # never by a path whose files may have changed since.
        model = core.read_model(str(xml), str(weights))
        config = {str(k): str(v) for k, v in (variant.options.get("config") or {}).items()}
        unknown = sorted(set(config) - set(_RECORD_OPTIONS))
        if unknown or variant.options.get("device", DEVICE) != DEVICE:
            raise RuntimeError(f"{variant.id}: its record asks for compile options {unknown} or device "
                               f"{variant.options.get('device')!r}; only {list(_RECORD_OPTIONS)} on {DEVICE}")
        _check_values(variant.id, config)
        wanted = config.get("INFERENCE_PRECISION_HINT")
        if wanted != _HINTS.get(variant.precision):
            raise RuntimeError(f"{variant.id}: its record asks for INFERENCE_PRECISION_HINT {wanted!r}; "
                               f"{variant.precision} needs {_HINTS.get(variant.precision)!r}")
        compiled = _compile(core, model, config)
        got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if got != wanted:
            # The plugin silently compiles bf16 as f32 without bf16 hardware: a failed load.
            raise RuntimeError(f"{variant.id}: compiled with inference precision {got}, not {wanted}")
        inputs = sorted(n for port in compiled.inputs for n in port.get_names())
        expected = context.signature.input_names
        if sorted(expected) != inputs:
            raise RuntimeError(f"{variant.id}: OpenVINO inputs {inputs} do not match {expected}")
        index = {n: i for i, port in enumerate(compiled.outputs) for n in port.get_names()}
        missing = [n for n in context.signature.output_names if n not in index]
        if missing:
            raise RuntimeError(f"{variant.id}: OpenVINO outputs lack {missing} (has {sorted(index)})")
        return OpenVINORunner(compiled, [index[n] for n in context.signature.output_names])

    def pip_requirements(self, variant) -> list:
        return [pin_requirement("openvino", variant)]


_PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


def _check_values(variant_id: str, config: dict) -> None:
    """Refuse, naming what was expected, thread and stream counts that are not whole numbers
    from 0 (automatic) up, and unknown performance hints. (The CPU plugin itself lowers counts
    above this host's cores.)"""
    for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS"):
        if key not in config:
            continue
        try:
            count = int(config[key])
        except ValueError:
            raise RuntimeError(f"{variant_id}: its record sets {key}={config[key]!r}; expected a whole number") from None
        if count < 0:
            raise RuntimeError(f"{variant_id}: its record sets {key}={count}; expected 0 (automatic) or more")
    hint = config.get("PERFORMANCE_HINT")
    if hint is not None and hint not in _PERFORMANCE_HINTS:
        raise RuntimeError(f"{variant_id}: its record sets PERFORMANCE_HINT={hint!r}; expected one of "
                           f"{list(_PERFORMANCE_HINTS)}")


_BF16_MISSING = f"bf16 needs a CPU with AVX512-BF16 or AMX (this host has none of {', '.join(BF16_ISA)})"


def conform(model, signature, aliases: dict | None = None):
    """``model`` with the signature's input names, outputs named and in signature order, and
    input shapes fixed except for the batch and the other dynamic axes (-1 in the signature).

    ``aliases`` maps other names an input may carry (the program's placeholder names) to the
    signature's. Outputs are matched by name when the model has them all (an ONNX export names
    them), else by position (``convert_model(ExportedProgram)`` keeps the flat tuple's order).
    """
    import openvino as ov

    wanted = signature.input_names
    aliases = {**(aliases or {}), **{n: n for n in wanted}}
    params = {}
    for param in model.get_parameters():
        names = param.output(0).get_names()
        name = next((aliases[n] for n in sorted(names) if n in aliases), None)
        if name is None or name in params:
            raise RuntimeError(f"OpenVINO input {sorted(names)} does not match any of the signature's "
                               f"inputs {wanted}")
        params[name] = param
    if sorted(params) != sorted(wanted):
        raise RuntimeError(f"OpenVINO inputs {sorted(params)} do not match the signature's {wanted}")

    results = model.get_results()
    out_names = signature.output_names
    by_name = {n: r for r in results for n in r.output(0).get_tensor().get_names()}
    if all(n in by_name for n in out_names) and len(results) == len(out_names):
        ordered = [by_name[n] for n in out_names]
    elif len(results) == len(out_names):
        ordered = list(results)
    else:
        raise RuntimeError(f"OpenVINO model has {len(results)} outputs; the signature has {len(out_names)} "
                           f"({out_names})")
    for result, name in zip(ordered, out_names):
        result.output(0).get_tensor().set_names({name})
    for name, param in params.items():
        param.output(0).get_tensor().set_names({name})
    conformed = ov.Model(ordered, [params[n] for n in wanted], model.get_friendly_name())
    conformed.reshape({n: ov.PartialShape(list(t.shape)) for n, t in zip(wanted, signature.inputs)})
    return conformed


def _aliases(program, signature) -> dict:
    """{placeholder name: signature input name}: the program's user inputs are in call order."""
    user_inputs = list(getattr(getattr(program, "graph_signature", None), "user_inputs", ()))
    if len(user_inputs) != len(signature.input_names):
        return {}
    return dict(zip(user_inputs, signature.input_names))


def _compile(core, model, config: dict):
    """``core.compile_model`` with the compile cache where it can be written; a cache that fails
    (a full disk) costs the cache, not the load."""
    cache = _cache_dir()
    if cache is None:
        return core.compile_model(model, DEVICE, config)
    try:
        return core.compile_model(model, DEVICE, {**config, "CACHE_DIR": str(cache)})
    except RuntimeError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        _logger.warning("chimera: OpenVINO compile with the cache %s failed (%s); compiling without it",
                        cache, first_line)
        return core.compile_model(model, DEVICE, config)


def _cache_dir() -> Path | None:
    """OpenVINO's compile cache under the chimera cache, or None where it cannot be written
    (a read-only file system): compiling without a cache beats failing the load."""
    from mlflow_chimera.cache import cache_root, unwritable_reason

    folder = cache_root() / "openvino"
    why = unwritable_reason(folder)
    if why is not None:
        _logger.info("chimera: no OpenVINO compile cache (%s cannot be written: %s)", folder, why)
        return None
    return folder
