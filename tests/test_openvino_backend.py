"""OpenVINO backend: fp32 parity with the precision hint pinned, bf16 only on bf16 hardware,
torch-free loading, thread safety, compatibility rules and the ONNX conversion fallback."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import models
from mlflow_chimera import flavor
from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.base import BuildContext, major_minor
from mlflow_chimera.backends.openvino_backend import OpenVINOBackend, bf16_hardware, conform
from mlflow_chimera.manifest import READY, Variant
from mlflow_chimera.selection import rank

HERE = host_mod.fingerprint()
HAS_BF16 = bf16_hardware(HERE)
NO_BF16 = "this host's CPU has neither AVX512-BF16 nor AMX: no bf16 variant is built or served here"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saves each model once per module with the given backends/precisions; returns its path."""
    paths = {}

    def get(kind: str, backends=("openvino",), precisions=("fp32",)) -> Path:
        key = (kind, tuple(backends), tuple(precisions))
        if key not in paths:
            path = tmp_path_factory.mktemp("ov") / kind
            flavor.save_model(models.BUILDERS[kind](), str(path), input_example=models.examples()[kind],
                              backends=list(backends), precisions=list(precisions))
            paths[key] = path
        return paths[key]

    return get


def _record(path: Path, vid: str) -> Variant:
    return Variant.load(path / "variants" / vid)


def _hint(loaded) -> str:
    return loaded.get_raw_model().runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


@pytest.mark.parametrize("kind", ["cnn", pytest.param("transformer", marks=pytest.mark.slow)])
def test_fp32_variant_passes_fp32_parity_with_the_precision_hint_pinned(saved, kind):
    path = saved(kind)
    v = _record(path, "openvino-fp32-cpu")
    assert v.status == READY and v.parity.passed, v.reason
    assert v.parity.tolerance == {"atol": 1e-4, "rtol": 1e-3}
    assert {c["batch"] for c in v.parity.checks} >= {1, 16}  # the dynamic batch holds
    assert set(v.files) == {"model.xml", "model.bin"}
    assert v.options["config"] == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    assert v.provenance["compiler"] == "ov.convert_model(ExportedProgram)"
    assert v.provenance["conversion"] == "direct" and "conversion_fallback_reason" not in v.provenance
    assert v.provenance["compile_config"] == v.options["config"]
    assert v.provenance["openvino_version"].startswith(HERE.packages["openvino"])
    assert v.requirements == {"device": "cpu",
                              "packages": {"openvino": major_minor(HERE.packages["openvino"])}}

    loaded = mlflow.pyfunc.load_model(str(path))
    assert loaded.get_raw_model().variant.id == "openvino-fp32-cpu"
    assert _hint(loaded) == "f32"  # read back from the compiled model, not the record
    (port,) = loaded.get_raw_model().runner.compiled.inputs
    fixed = ",".join(map(str, models.examples()[kind].shape[1:]))
    assert str(port.get_partial_shape()) == f"[?,{fixed}]"  # only the batch is dynamic
    x = models.examples(batch=5, seed=3)[kind]
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(models.BUILDERS[kind](), x)[0],
                               atol=1e-4, rtol=1e-3)


def test_a_record_cannot_unpin_the_hint_or_add_compile_options(saved):
    from mlflow_chimera.backends.base import LoadContext

    path = saved("cnn")
    good = _record(path, "openvino-fp32-cpu")
    context = LoadContext(model_dir=path, signature=None, reference_sha256="")
    pinned = good.options["config"]
    for config, match in (({"PERFORMANCE_HINT": "LATENCY"}, "INFERENCE_PRECISION_HINT None"),
                          ({**pinned, "INFERENCE_PRECISION_HINT": "bf16"}, "fp32 needs 'f32'"),
                          ({**pinned, "CACHE_DIR": str(path)}, r"compile options \['CACHE_DIR'\]"),
                          ({**pinned, "NUM_STREAMS": "many"}, "NUM_STREAMS='many'; expected a whole number"),
                          ({**pinned, "INFERENCE_NUM_THREADS": "-3"}, "expected 0 \\(automatic\\) or more"),
                          ({**pinned, "PERFORMANCE_HINT": "FASTEST"}, "expected one of")):
        altered = dataclasses.replace(good, options={**good.options, "config": config})
        with pytest.raises(RuntimeError, match=match):
            OpenVINOBackend().load(altered, path / "variants" / good.id, context)


def test_multi_input_multi_output_names_and_order(saved):
    path = saved("two_in_two_out")
    loaded = mlflow.pyfunc.load_model(str(path))
    compiled = loaded.get_raw_model().runner.compiled
    assert [p.get_any_name() for p in compiled.inputs] == ["features", "context"]
    assert [p.get_any_name() for p in compiled.outputs] == ["score", "embedding"]
    x = models.examples(batch=3, seed=1)["two_in_two_out"]
    got = loaded.predict(x)
    score, embedding = models.eager_outputs(models.two_in_two_out(), x)
    np.testing.assert_allclose(got["score"], score, atol=1e-5)
    np.testing.assert_allclose(got["embedding"], embedding, atol=1e-5)


class Tokens(torch.nn.Module):
    """Integer token ids with a dynamic sequence, bounded by its position table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 8)
        self.position = torch.nn.Parameter(torch.randn(1, 32, 8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids) + self.position[:, : input_ids.shape[1]]).mean(dim=1)


def test_dynamic_sequence_axis_stays_dynamic(tmp_path):
    model = Tokens().eval()
    ids = np.random.default_rng(0).integers(0, 100, (2, 12))
    flavor.save_model(model, str(tmp_path / "m"), input_example=ids, backends=["openvino"],
                      precisions=["fp32"], dynamic_shapes={"input_ids": {1: "sequence"}})
    v = _record(tmp_path / "m", "openvino-fp32-cpu")
    assert v.status == READY and v.parity.passed, v.reason
    assert "shorter_axes" in {c["case"] for c in v.parity.checks}
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    (port,) = loaded.get_raw_model().runner.compiled.inputs
    assert str(port.get_partial_shape()) == "[?,?]" and port.get_element_type().get_type_name() == "i64"
    longer = np.random.default_rng(1).integers(0, 100, (3, 20))
    with torch.no_grad():
        expected = model(torch.from_numpy(longer)).numpy()
    np.testing.assert_allclose(loaded.predict(longer), expected, atol=1e-5)


def test_signature_that_cannot_be_matched_is_a_clear_error():
    import openvino as ov

    from mlflow_chimera.capture import capture

    captured = capture(models.two_in_two_out(), models.examples()["two_in_two_out"])
    one_output = dataclasses.replace(captured.signature, outputs=captured.signature.outputs[:1])
    with pytest.raises(RuntimeError, match=r"has 2 outputs; the signature has 1"):
        conform(ov.convert_model(captured.program), one_output)
    renamed = dataclasses.replace(captured.signature, inputs=[dataclasses.replace(t, name=f"other_{t.name}")
                                                              for t in captured.signature.inputs])
    with pytest.raises(RuntimeError, match=r"does not match any of the signature's inputs"):
        conform(ov.convert_model(captured.program), renamed)


def _bf16_record(tmp_path) -> Variant:
    """A bf16 variant record made by the backend itself (plan for a host with AMX, build), as a
    bf16 host would have logged it."""
    from mlflow_chimera.capture import capture

    amx_host = dataclasses.replace(HERE, isa=(*HERE.isa, "amx_bf16"))
    (plan,) = OpenVINOBackend().plan(["bf16"], amx_host)
    captured = capture(models.mlp(), models.examples()["mlp"])
    out = tmp_path / plan.id
    out.mkdir()
    context = BuildContext(program=captured.program, program_path=tmp_path / "unused.pt2",
                           signature=captured.signature, example=captured.example, scratch_dir=tmp_path)
    built = OpenVINOBackend().build(plan, out, context)
    return Variant(id=plan.id, backend=plan.backend, precision=plan.precision, target=plan.target,
                   status=READY, options=plan.options, requirements=built.requirements,
                   provenance=built.provenance)


def test_bf16_variant_is_refused_without_bf16_hardware(saved, tmp_path):
    fp32 = _record(saved("cnn"), "openvino-fp32-cpu")
    bf16 = _bf16_record(tmp_path)
    assert bf16.id == "openvino-bf16-cpu"
    assert bf16.options["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert set(bf16.requirements["isa"]) == {"avx512_bf16", "amx_bf16"}

    no_bf16 = dataclasses.replace(HERE, isa=("avx", "avx2", "avx512f", "fma", "sse4_2"))
    assert OpenVINOBackend().plan(["fp32", "bf16"], no_bf16)[0].id == "openvino-fp32-cpu"
    decision = rank([fp32, bf16], no_bf16, {"precision": "any"})
    assert [c.variant.id for c in decision.candidates] == ["openvino-fp32-cpu"]
    reason = decision.rejected["openvino-bf16-cpu"]
    assert "bf16 needs a CPU with AVX512-BF16 or AMX" in reason
    assert f"openvino-bf16-cpu: {reason}" in decision.explain()

    for flag in ("amx_bf16", "avx512_bf16"):
        with_bf16 = dataclasses.replace(no_bf16, isa=(*no_bf16.isa, flag))
        decision = rank([fp32, bf16], with_bf16, {"precision": "bf16"})
        assert [c.variant.id for c in decision.candidates] == ["openvino-bf16-cpu"], flag
    # fp32 runs anywhere OpenVINO does, ARM included.
    arm = dataclasses.replace(no_bf16, arch="aarch64", isa=("asimd", "neon"))
    assert OpenVINOBackend().incompatibility(fp32, arm) is None


@pytest.mark.skipif(HAS_BF16, reason="this host runs bf16 natively")
def test_a_bf16_variant_that_would_run_as_f32_fails_to_load(tmp_path):
    """Without bf16 hardware the CPU plugin silently compiles a bf16 hint as f32; the loader
    refuses that rather than serve a variant that is not what its record says."""
    from mlflow_chimera.backends.base import LoadContext
    from mlflow_chimera.manifest import digest_tree

    bf16 = _bf16_record(tmp_path)
    bf16.files = digest_tree(tmp_path / bf16.id)
    context = LoadContext(model_dir=tmp_path, signature=None, reference_sha256="")
    with pytest.raises(RuntimeError, match="compiled with inference precision f32, not bf16"):
        OpenVINOBackend().load(bf16, tmp_path / bf16.id, context)


@pytest.mark.skipif(not HAS_BF16, reason=NO_BF16)
def test_bf16_variant_passes_its_gate_and_is_served_only_on_request(saved):
    path = saved("mlp", precisions=("fp32", "bf16"))
    bf16 = _record(path, "openvino-bf16-cpu")
    assert bf16.status == READY and bf16.parity.passed, bf16.reason
    assert bf16.parity.tolerance == {"atol": 1e-2, "rtol": 1e-2}
    assert bf16.requirements["isa"] and bf16.provenance["isa_needed"]
    default = mlflow.pyfunc.load_model(str(path))
    assert default.get_raw_model().variant.id == "openvino-fp32-cpu"
    assert _hint(default) == "f32"  # pinned, although this CPU would default to bf16
    asked = mlflow.pyfunc.load_model(str(path), model_config={"precision": "bf16"})
    assert asked.get_raw_model().variant.id == "openvino-bf16-cpu"
    assert _hint(asked) == "bf16"
    x = models.examples(batch=4, seed=2)["mlp"]
    np.testing.assert_allclose(asked.predict(x), models.eager_outputs(models.mlp(), x)[0],
                               atol=5e-2, rtol=5e-2)


def test_loading_in_a_fresh_process_imports_neither_torch_nor_onnxruntime(saved, tmp_path):
    path = saved("cnn")
    x = models.examples(batch=3, seed=7)["cnn"]
    np.save(tmp_path / "x.npy", x)
    code = f"""
        import json, sys
        import numpy as np
        import mlflow
        m = mlflow.pyfunc.load_model({str(path)!r})
        y = m.predict(np.load("x.npy"))
        print(json.dumps({{
            "variant": m.get_raw_model().variant.id,
            "prediction": np.asarray(y).tolist(),
            "heavy": sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "onnxruntime")),
            "openvino": "openvino" in sys.modules,
        }}))
        """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_PYFUNC_INFERENCE_CONFIG")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["variant"] == "openvino-fp32-cpu"
    assert result["heavy"] == []
    assert result["openvino"] is True
    local = mlflow.pyfunc.load_model(str(path)).predict(x)
    np.testing.assert_array_equal(np.asarray(result["prediction"], dtype=np.float32), local)


def test_eight_threads_get_exactly_the_single_thread_results(saved):
    runner = mlflow.pyfunc.load_model(str(saved("transformer"))).get_raw_model().runner
    inputs = [{"tokens": models.examples(batch=b, seed=s)["transformer"]}
              for s, b in enumerate((1, 2, 3, 5) * 2)]
    expected = [runner.run(x)[0] for x in inputs]
    barrier, results, errors = threading.Barrier(8), {}, []

    def work(t: int):
        try:
            barrier.wait()
            for rep in range(10):
                i = (t + rep) % len(inputs)
                results[(t, rep)] = (i, runner.run(inputs[i])[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 80
    for i, got in results.values():
        np.testing.assert_array_equal(got, expected[i])


def test_incompatible_when_openvino_is_missing_or_older(saved):
    v = _record(saved("cnn"), "openvino-fp32-cpu")
    backend = OpenVINOBackend()
    assert backend.incompatibility(v, HERE) is None
    missing = dataclasses.replace(HERE, packages={k: p for k, p in HERE.packages.items() if k != "openvino"})
    assert backend.incompatibility(v, missing) == "openvino is not installed on this host"
    older = dataclasses.replace(HERE, packages={**HERE.packages, "openvino": "2025.1.0"})
    reason = backend.incompatibility(v, older)
    built = v.requirements["packages"]["openvino"]
    assert reason == f"openvino 2025.1.0 is older than {built}, which built and validated this variant"
    newer = dataclasses.replace(HERE, packages={**HERE.packages, "openvino": "2099.0.0"})
    assert backend.incompatibility(v, newer) is None
    decision = rank([v], older)
    assert decision.candidates == [] and "is older than" in decision.explain()
    assert backend.pip_requirements(v) == [f"openvino=={HERE.packages['openvino']}"]


def test_compile_cache_is_used_and_optional(saved, tmp_path, monkeypatch):
    path = saved("cnn")
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "cache"))
    mlflow.pyfunc.load_model(str(path)).predict(models.examples()["cnn"])
    assert list((tmp_path / "cache" / "openvino").glob("*.blob"))
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    loaded = mlflow.pyfunc.load_model(str(path))
    assert loaded.get_raw_model().variant.id == "openvino-fp32-cpu"
    np.testing.assert_allclose(loaded.predict(models.examples()["cnn"]),
                               models.eager_outputs(models.cnn(), models.examples()["cnn"])[0], atol=1e-4)

    import openvino

    real, tried = openvino.Core.compile_model, []

    def cache_write_fails(self, model, device, config):  # as on a full disk
        tried.append("CACHE_DIR" in config)
        if "CACHE_DIR" in config:
            raise RuntimeError("simulated: cannot write the cache blob")
        return real(self, model, device, config)

    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(openvino.Core, "compile_model", cache_write_fails)
    loaded = mlflow.pyfunc.load_model(str(path))
    assert loaded.get_raw_model().variant.id == "openvino-fp32-cpu" and tried == [True, False]


def test_onnx_route_is_used_and_recorded_when_direct_conversion_fails(tmp_path):
    path = tmp_path / "fallback"
    flavor.save_model(models.mlp(), str(path), input_example=models.examples()["mlp"],
                      backends=["faulty_backends:DirectConversionFailsOpenVINO"], precisions=["fp32"])
    v = _record(path, "openvino-fp32-cpu")
    assert v.status == READY and v.parity.passed, v.reason
    assert v.provenance["conversion"] == "onnx"
    assert v.provenance["compiler"] == "ov.convert_model(ONNX export)"
    assert "simulated ExportedProgram conversion failure" in v.provenance["conversion_fallback_reason"]
    loaded = mlflow.pyfunc.load_model(str(path))
    assert _hint(loaded) == "f32"
    x = models.examples(batch=5)["mlp"]
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(models.mlp(), x)[0], atol=1e-4)
