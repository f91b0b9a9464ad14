"""The ``chimera`` MLflow flavor: ``save_model``, ``log_model``, ``load_model``.

``save_model`` captures the model once with ``torch.export`` (the reference program), builds
every variant this host can build, gates each on parity with the eager model, times it, and
writes an MLflow model directory whose ``python_function`` flavor loads the fastest valid
variant on whatever host loads it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _copy_extra_files,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

import mlflow_chimera
from mlflow_chimera import backends as backend_registry
from mlflow_chimera import host as host_mod
from mlflow_chimera import reference
from mlflow_chimera.batching import BatchingConfig
from mlflow_chimera.capture import capture, eval_mode
from mlflow_chimera.catalog import PAYLOAD_ROOT
from mlflow_chimera.errors import NothingUsableError
from mlflow_chimera.selection import check_config
from mlflow_chimera.signing import key_id, signing_key
from mlflow_chimera.backends.torch_runner import TorchRunner
from mlflow_chimera.compile.pipeline import build_variants, check_request
from mlflow_chimera.manifest import (
    CHECK_INPUTS,
    CHECK_OUTPUTS,
    READY,
    REFERENCE_DIR,
    REFERENCE_PROGRAM,
    read_mlmodel,
    sha256_file,
    variant_dir,
)

FLAVOR_NAME = mlflow_chimera.FLAVOR_NAME  # one home: the package root, importable without MLflow
# Saved so that these keys can be overridden at load time (MLflow drops keys it did not save).
DEFAULT_MODEL_CONFIG = {"variant": "auto", "backend": "auto", "precision": "auto", "accuracy": "auto",
                        "max_abs_err": "auto", "batching": "off"}


def _default_model_config(precisions, model_config: dict | None = None) -> dict:
    """The pyfunc defaults saved with the model: the author's ``model_config`` over chimera's.
    Selection serves fp32 unless asked otherwise; an author who built only lossy precisions
    has asked, so their model serves any precision."""
    config = dict(DEFAULT_MODEL_CONFIG)
    if precisions and "fp32" not in precisions:
        config["precision"] = "any"
    unknown = sorted(set(model_config or {}) - set(DEFAULT_MODEL_CONFIG))
    if unknown:
        raise MlflowException(f"model_config keys {unknown} are not chimera settings; known: "
                              f"{', '.join(DEFAULT_MODEL_CONFIG)}", error_code=INVALID_PARAMETER_VALUE)
    config.update(model_config or {})
    try:
        check_config(config)
        BatchingConfig.from_setting(config["batching"], reference.MAX_BATCH)
    except ValueError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
    return config


def get_default_pip_requirements(variants=(), find_links: str | None = None) -> list:
    """This package plus what the ready variants' runtimes need, each pinned to the version
    that built them: ``onnxruntime`` for ONNX Runtime variants, ``openvino`` for OpenVINO ones,
    ``torch`` only for torch-based ones (eager, AOTInductor, torch.compile). Variants that are
    not ready add nothing.

    ``find_links``: a folder of the model directory holding a wheel of mlflow-chimera (the
    ``code`` folder, when its wheel is one of ``code_paths``). It is written as ``--find-links``,
    which pip resolves against the folder of ``requirements.txt``, so an environment built from
    the model (``mlflow models build-docker``, ``--env-manager virtualenv``) installs
    mlflow-chimera from the model itself, without a package index that has it.
    """
    reqs = {f"mlflow-chimera=={mlflow_chimera.__version__}"}
    for v in variants:
        if v.status == READY:
            reqs.update(backend_registry.for_build(v.backend).pip_requirements(v))
    return ([f"--find-links {find_links}"] if find_links else []) + sorted(reqs)


def _chimera_wheels(code_paths) -> list:
    """The wheels of mlflow-chimera among ``code_paths`` (files given directly). One of another
    version than the running one, which builds the model and writes its records, is refused."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    found = []
    for code_path in code_paths or ():
        name = os.path.basename(str(code_path))
        if not name.endswith(".whl"):
            continue
        try:
            project, version, _, _ = parse_wheel_filename(name)
        except InvalidWheelFilename:
            continue
        if project != canonicalize_name("mlflow-chimera"):
            continue
        if str(version) != mlflow_chimera.__version__:
            raise MlflowException(
                f"code_paths holds {name}, but this model is built by mlflow-chimera "
                f"{mlflow_chimera.__version__}; bundle the wheel of the version that builds it",
                error_code=INVALID_PARAMETER_VALUE)
        found.append(name)
    return found


def save_model(
    model,
    path,
    input_example=None,
    signature: ModelSignature | None = None,
    mlflow_model: Model | None = None,
    pip_requirements=None,
    extra_pip_requirements=None,
    metadata: dict | None = None,
    backends=None,
    precisions=None,
    tolerances: dict | None = None,
    benchmark: dict | None = None,
    build_timeout: float | None = None,
    build_parallelism: int | None = None,
    dynamic_shapes: dict | None = None,
    signing_key_path: str | None = None,
    model_config: dict | None = None,
    conda_env=None,
    code_paths: list | None = None,
    extra_files: list | None = None,
    _payload_run_id: str | None = None,
    **kwargs,
):
    """Save a PyTorch model as a chimera model directory at ``path``.

    Args:
        model: a ``torch.nn.Module`` whose ``forward`` takes tensors and returns a tensor, a
            tuple/list of tensors or a dict of tensors.
        path: local directory to create.
        input_example: required — an array/tensor, a tuple of them (positional inputs) or a dict
            (named inputs). It fixes the non-batch shapes and dtypes; the batch stays dynamic.
        signature: an MLflow signature; by default one is derived from the captured model.
        backends: backends to build (default: every backend this host can build).
        precisions: precisions to build (default ``("fp32", "bf16", "int8")``; bf16 only by
            backends that have it, on CPUs with native bf16).
        tolerances: parity tolerances per precision, e.g. ``{"fp32": {"atol": 1e-5}}``.
        benchmark: timing options (see ``compile.timing.TimingConfig``), e.g. ``{"max_seconds": 0.5}``.
        build_timeout: seconds each variant's build (in its own process) may take before it is
            killed and recorded as failed (default 900).
        build_parallelism: concurrent builds (default: what the host has room for; 1 on 2 cores).
        dynamic_shapes: dynamic axes besides the batch, per input, e.g.
            ``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}``.
        signing_key_path: an EC private key (PEM) to sign every ready variant with (OpenSSF
            model-signing); default ``$CHIMERA_SIGNING_KEY``; unsigned when neither is set.
        model_config: selection defaults saved with the model, which a loader's own
            ``model_config`` overrides key by key — e.g. ``{"precision": "bf16"}`` or
            ``{"max_abs_err": 1e-2}`` to serve a faster lossy variant by default (see
            :mod:`mlflow_chimera.selection`).
        conda_env, code_paths, extra_files: as in MLflow's own flavors (``conda_env`` instead of
            ``pip_requirements``; ``code_paths`` are added to ``sys.path`` when the pyfunc loads;
            ``extra_files`` are stored under ``extra_files/``). Their sha256 digests are part of
            the manifest that the ``chimera.anchor`` tag pins. A wheel of mlflow-chimera given
            in ``code_paths`` is what environments built from the model install (pip and
            virtualenv ones, e.g. ``mlflow models build-docker``; see
            :func:`get_default_pip_requirements`).

    Raises:
        CaptureError: the model cannot be captured, or its eager outputs cannot be served (NaN,
            non-deterministic forward) — raised before anything is built.
        NothingUsableError: no variant is ready; the message names each variant's cause.
    """
    if input_example is None:
        raise MlflowException(
            "mlflow.chimera needs an input_example: it fixes the input shapes and dtypes the "
            "model is captured with (torch.export) and checked at.",
            error_code=INVALID_PARAMETER_VALUE,
        )
    if kwargs:
        raise MlflowException(f"mlflow.chimera.save_model got unexpected keyword argument(s) {sorted(kwargs)}",
                              error_code=INVALID_PARAMETER_VALUE)
    try:
        _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    except ValueError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
    check_request(backends, precisions)
    pyfunc_config = _default_model_config(precisions, model_config)
    bundled_wheels = _chimera_wheels(code_paths)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    mlflow_model = mlflow_model or Model()
    started = time.perf_counter()

    with eval_mode(model):  # the model is handed back exactly as it came, also on failure
        captured = capture(model, input_example, dynamic_shapes)
        sig, example = captured.signature, captured.example
        Path(path, REFERENCE_DIR).mkdir(parents=True)
        program_path = Path(path, REFERENCE_PROGRAM)
        reference_sha256 = reference.save_program(captured.program, program_path)
        eager = TorchRunner(captured.eager, sig).run  # the user's model: what every variant must match
        np.savez(Path(path, CHECK_INPUTS), **example)
        np.savez(Path(path, CHECK_OUTPUTS), **dict(zip(sig.output_names, captured.eager_outputs)))

        variants, skipped = build_variants(
            model_dir=Path(path), program_path=program_path, reference_sha256=reference_sha256,
            signature=sig, example=example, reference_fn=eager, backends=backends,
            precisions=precisions, tolerances=tolerances, benchmark=benchmark,
            build_timeout=build_timeout, parallelism=build_parallelism,
        )
    _require_a_ready_variant(variants)
    import torch

    reference_size = program_path.stat().st_size
    reference_uri = None
    if _payload_run_id:  # logging: payloads go to the run's artifacts (see cache.py)
        reference_uri = _externalize_payloads(Path(path), variants, _payload_run_id)
    host = host_mod.fingerprint()
    checks = {"inputs": sha256_file(Path(path, CHECK_INPUTS)), "outputs": sha256_file(Path(path, CHECK_OUTPUTS))}
    key = signing_key(signing_key_path)
    if key is not None:
        _sign_variants(Path(path), variants, key, reference_sha256, checks, sig)
    code_dir = _validate_and_copy_code_paths(code_paths, path)
    attached = _copy_extra_files(extra_files, path)
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        chimera_version=mlflow_chimera.__version__,
        reference={
            "path": REFERENCE_PROGRAM,
            "uri": reference_uri,
            "sha256": reference_sha256,
            "size_bytes": reference_size,
            "exporter": "torch.export",
            "torch_version": str(torch.__version__),
            "dynamic_batch": [1, reference.MAX_BATCH],
        },
        signature=sig.to_dict(),
        checks=checks,
        signed_by=key_id(key) if key is not None else None,
        build_host_class=host.host_class,
        build_seconds=round(time.perf_counter() - started, 3),
        variants={v.id: _summary(v, path) for v in variants},
        skipped_backends=skipped,
        dropped_outputs=captured.dropped_outputs,
        capture_switches=captured.constants,
        code=code_dir,
        attached_files=_digests(path, [code_dir] + [f["path"] for f in attached.get("extra_files", [])]),
        **attached,
    )
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_chimera",
        code=code_dir,
        model_config=pyfunc_config,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
    )
    mlflow_model.signature = signature or _mlflow_signature(sig)
    _save_example(mlflow_model, example if len(example) > 1 else next(iter(example.values())), path)
    if metadata is not None:
        mlflow_model.metadata = metadata
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
    default_reqs = get_default_pip_requirements(variants, find_links=code_dir if bundled_wheels else None)
    _write_environment(path, default_reqs, pip_requirements, extra_pip_requirements, conda_env)
    if _payload_run_id and mlflow_model.model_id:
        _anchor(path, mlflow_model.model_id)
    return mlflow_model


def _sign_variants(model_dir: Path, variants: list, key: Path, reference_sha256: str, checks: dict, sig) -> None:
    """Sign every ready variant's record together with the model it belongs to."""
    from mlflow_chimera.trust import sign_variant

    model_facts = {"reference": {"sha256": reference_sha256}, "checks": checks, "signature": sig.to_dict()}
    for v in variants:
        if v.status == READY:
            sign_variant(variant_dir(model_dir, v.id), v.id, model_facts, key)


def _anchor(path: str, model_id: str) -> None:
    """Record the manifest's digest on the logged model in the tracking store — the anchor a
    loader checks the artifact store against. Written before the version is registered."""
    from mlflow.tracking import MlflowClient

    from mlflow_chimera.trust import ANCHOR_TAG, manifest_digest

    saved = read_mlmodel(Path(path, MLMODEL_FILE_NAME))
    flavors = saved["flavors"]
    digest = manifest_digest(flavors[FLAVOR_NAME], flavors.get("python_function", {}).get("config"))
    MlflowClient().set_logged_model_tags(model_id, {ANCHOR_TAG: digest})


def _require_a_ready_variant(variants: list) -> None:
    """A model with no variant that can be served is an error, never a success."""
    if any(v.status == READY for v in variants):
        return
    lines = [f"  {v.id}: {v.status}: {v.reason or 'no reason recorded'}" for v in variants]
    raise NothingUsableError("no variant of this model is ready to serve, so nothing was saved:\n"
                             + ("\n".join(lines) or "  (no backend could build any variant here)"))


def _externalize_payloads(model_dir: Path, variants: list, run_id: str) -> str:
    """Upload each variant's files and the reference program to the run's artifacts
    (``chimera/variants/<id>/``, ``chimera/reference/``) and keep only the records in the
    model directory, so loading the model fetches just the variant it runs. Returns the
    reference program's URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for v in variants:
        if not v.files:
            continue
        vdir = variant_dir(model_dir, v.id)
        v.location = f"runs:/{run_id}/{PAYLOAD_ROOT}/variants/{v.id}"
        v.save(vdir)
        client.log_artifacts(run_id, str(vdir), artifact_path=f"{PAYLOAD_ROOT}/variants/{v.id}")
        for rel in v.files:
            Path(vdir, rel).unlink()
    program = model_dir / REFERENCE_PROGRAM
    client.log_artifact(run_id, str(program), artifact_path=f"{PAYLOAD_ROOT}/reference")
    program.unlink()
    return f"runs:/{run_id}/{PAYLOAD_ROOT}/reference/{program.name}"


def _summary(v, model_dir) -> dict:
    """The MLmodel entry of a variant: key facts, and the digest that anchors its variant.json."""
    entry = {
        "backend": v.backend,
        "precision": v.precision,
        "target": v.target,
        "status": v.status,
        "variant_json_sha256": sha256_file(variant_dir(model_dir, v.id) / "variant.json"),
    }
    if v.reason:
        entry["reason"] = v.reason[:300]
    if v.parity is not None:
        entry["parity_max_abs"] = float(v.parity.max_abs)
        entry["parity_max_rel"] = float(v.parity.max_rel)
    if v.benchmarks:
        latency = v.benchmarks[0].latency_ms
        entry["p50_ms"] = {k: round(r["p50"], 5) for k, r in latency.items()}
        entry["p99_ms"] = {k: round(r["p99"], 5) for k, r in latency.items()}
    prov = v.provenance
    if "compiler" in prov:
        entry["compiler"] = f"{prov['compiler']} {prov.get('compiler_version', '')}".strip()
    for key in ("exporter", "opset", "build_seconds", "size_bytes"):
        if key in prov:
            entry[key] = prov[key]
    if v.options:
        entry["options"] = v.options
    entry["files"] = v.files
    return entry


def _mlflow_signature(sig) -> ModelSignature:
    """Tensor signature with a -1 batch. One input/output stays unnamed so that a plain array
    (or a DataFrame) is accepted; several are named, as MLflow requires for dict inputs."""
    def schema(tensors):
        named = len(tensors) > 1
        return Schema([TensorSpec(np.dtype(t.dtype), tuple(t.shape), t.name if named else None)
                       for t in tensors])

    return ModelSignature(inputs=schema(sig.inputs), outputs=schema(sig.outputs))


def _digests(path: str, relative: list) -> dict:
    """{path: sha256} of every file under the given model-relative files or folders."""
    found = {}
    for rel in filter(None, relative):
        target = Path(path, rel)
        for file in sorted([target] if target.is_file() else target.rglob("*")):
            if file.is_file():
                found[file.relative_to(path).as_posix()] = sha256_file(file)
    return found


def _write_environment(path, default_reqs, pip_requirements, extra_pip_requirements, conda_env=None):
    import yaml

    if conda_env is not None:
        conda_env, reqs, constraints = _process_conda_env(conda_env)
    else:
        conda_env, reqs, constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(reqs))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


# Keywords log_model passes on untouched: MLflow's Model.log options and the MLflow flavor
# conventions save_model takes.
_LOG_MODEL_EXTRAS = {"artifact_path", "conda_env", "code_paths", "extra_files", "resources", "auth_policy",
                     "prompts", "model_type", "step", "model_id"}


def log_model(
    model,
    name: str | None = None,
    input_example=None,
    signature: ModelSignature | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements=None,
    extra_pip_requirements=None,
    metadata: dict | None = None,
    tags: dict | None = None,
    params: dict | None = None,
    backends=None,
    precisions=None,
    tolerances: dict | None = None,
    benchmark: dict | None = None,
    build_timeout: float | None = None,
    build_parallelism: int | None = None,
    dynamic_shapes: dict | None = None,
    signing_key_path: str | None = None,
    model_config: dict | None = None,
    **kwargs,
):
    """Log a PyTorch model as a chimera model (see :func:`save_model` for the chimera options).

    Returns MLflow's ``ModelInfo``. Each variant's benchmark and parity figures are logged as
    metrics (``chimera.<measure>/<variant>``) on the run and the logged model, the key facts
    become tags and a description on the run, the logged model and, when registered, the model
    version, and a report is written to the logged model's ``report/`` (see ``tracking.py``).
    Without an active run, one is started for the model and ended afterwards — as FAILED when
    ``log_model`` raises (then the logged model is FAILED and no version is registered).
    """
    from mlflow_chimera.tracking import record_variants

    unknown = sorted(set(kwargs) - _LOG_MODEL_EXTRAS)
    if unknown:
        raise MlflowException(f"mlflow.chimera.log_model got unexpected keyword argument(s) {unknown}",
                              error_code=INVALID_PARAMETER_VALUE)
    check_request(backends, precisions)
    _default_model_config(precisions, model_config)  # refuse a bad one before anything is logged
    own_run = mlflow.active_run() is None
    run = mlflow.start_run(run_name=name) if own_run else mlflow.active_run()
    try:
        info = Model.log(
            name=name,
            artifact_path=kwargs.pop("artifact_path", None),
            flavor=sys.modules[__name__],
            flavor_name=FLAVOR_NAME,
            registered_model_name=registered_model_name,
            await_registration_for=await_registration_for,
            input_example=input_example,
            signature=signature,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            metadata=metadata,
            tags=tags,
            params=params,
            backends=backends,
            precisions=precisions,
            tolerances=tolerances,
            benchmark=benchmark,
            build_timeout=build_timeout,
            build_parallelism=build_parallelism,
            dynamic_shapes=dynamic_shapes,
            signing_key_path=signing_key_path,
            model_config=model_config,
            _payload_run_id=run.info.run_id,
            run_id=run.info.run_id,
            model=model,
            **kwargs,
        )
        record_variants(info, run.info.run_id, registered_model_name)
    except BaseException:
        if own_run:
            mlflow.end_run(status="FAILED")
        raise
    if own_run:
        mlflow.end_run()
    return info


def load_model(model_uri: str, dst_path: str | None = None, model_config: dict | None = None,
               trust: str | None = None, trusted_keys=None):
    """Load a chimera model as a :class:`mlflow_chimera.runtime.ChimeraModel` (the chosen
    variant's runner, ``predict``, ``explain()``).

    ``model_config`` overrides, key by key, the defaults saved with the model (as
    ``mlflow.pyfunc.load_model`` does). ``trust`` is ``"anchored"`` (default, or
    ``$CHIMERA_TRUST``), ``"signed"`` or ``"digests"``; ``trusted_keys`` lists public keys
    (default ``$CHIMERA_TRUSTED_KEYS``). See ``trust.py``.
    """
    from mlflow_chimera import runtime
    from mlflow_chimera.trust import Policy, requested_source

    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    saved = _get_flavor_configuration(model_path=local_path, flavor_name="python_function").get("config")
    # A local directory counts as itself unless CHIMERA_MODEL_URI declares where it came from.
    source = requested_source(None if os.path.isdir(model_uri) else model_uri)
    return runtime.load(local_path, conf, {**(saved or {}), **(model_config or {})}, source=source,
                        policy=Policy.from_settings(trust, trusted_keys))

