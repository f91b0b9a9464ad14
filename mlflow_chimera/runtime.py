"""A loaded chimera model: the chosen variant's runner behind input checking, plus the
decision that chose it. This is what ``get_raw_model()`` returns."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mlflow_chimera import backends as backend_registry
from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.base import LoadContext
from mlflow_chimera.compile.parity import compare_outputs
from mlflow_chimera.manifest import (
    CHECK_INPUTS,
    CHECK_OUTPUTS,
    IntegrityError,
    Variant,
    variant_dir,
    verify_digests,
)
from mlflow_chimera.reference import MAX_BATCH, Signature
from mlflow_chimera.selection import Decision, rank

# A child of MLflow's logger, so that MLflow's log handler (also in `mlflow models serve`)
# shows which variant was loaded and which were skipped.
_logger = logging.getLogger("mlflow.chimera")


class InputError(ValueError):
    """Input that does not match the model's inputs; the message names the input and the spec."""


class ChimeraModel:
    """The variant this host runs, with the model's signature and the selection decision."""

    def __init__(self, variant: Variant, runner, signature: Signature, decision: Decision,
                 variants: list):
        self.variant = variant
        self.variants = variants  # every variant of the model, chosen or not
        self.runner = runner
        self.signature = signature
        self.decision = decision
        self._inputs = signature.inputs
        self._single = len(signature.inputs) == 1
        self._output_names = signature.output_names
        self._structure = signature.structure

    def explain(self) -> str:
        """Which variant runs here, the ranking, and why every other variant was not chosen."""
        return self.decision.explain()

    def variant_table(self) -> str:
        """Every variant with its parity and latency on this host class; marks the one loaded."""
        from mlflow_chimera.summary import variant_table

        return variant_table(self.variants, self.decision.host_class, self.variant.id)

    def predict(self, data):
        """Run the chosen variant. Takes an array (single-input models), a dict of arrays keyed
        by input name, or a pandas DataFrame; returns an array, or a dict for several outputs."""
        outputs = self.runner.run(self._named_inputs(data))
        if self._structure == "tensor":
            return outputs[0]
        return dict(zip(self._output_names, outputs))

    # -- input checking ----------------------------------------------------------------

    def _expected(self) -> str:
        return "; ".join(t.describe() for t in self._inputs)

    def _named_inputs(self, data) -> dict:
        spec = self._inputs[0]
        if self._single and type(data) is np.ndarray and data.dtype.name == spec.dtype \
                and data.ndim == len(spec.shape) and list(data.shape[1:]) == spec.shape[1:] \
                and data.flags.c_contiguous and 0 < data.shape[0] <= MAX_BATCH:
            return {spec.name: data}  # fast path: already exactly what the runner takes
        named = self._as_dict(data)
        missing = [t.name for t in self._inputs if t.name not in named]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model takes {self._expected()}")
        unexpected = sorted(set(named) - {t.name for t in self._inputs})
        if unexpected:
            raise InputError(f"unexpected input(s) {unexpected}; the model takes {self._expected()}")
        checked = {t.name: _check_tensor(t, named[t.name]) for t in self._inputs}
        batches = {n: a.shape[0] for n, a in checked.items()}
        if len(set(batches.values())) > 1:
            raise InputError(f"inputs have different batch sizes {batches}; they must agree")
        return checked

    def _as_dict(self, data) -> dict:
        names = [t.name for t in self._inputs]
        if isinstance(data, dict):
            return data
        if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):
            return self._from_dataframe(data)
        if isinstance(data, (np.ndarray, list, tuple)) and self._single:
            return {names[0]: data}
        if isinstance(data, (list, tuple)) and len(data) == len(names):
            return dict(zip(names, data))
        raise InputError(
            f"cannot use input of type {type(data).__name__}; the model takes {len(names)} "
            f"input(s) ({self._expected()}): pass "
            + ("an array, " if self._single else "")
            + "a dict of arrays keyed by input name, or a pandas DataFrame"
        )

    def _from_dataframe(self, df) -> dict:
        names = [t.name for t in self._inputs]
        if all(n in df.columns for n in names):
            # One column per input, each cell a (nested) list or array: one row per example.
            return {t.name: np.stack([np.asarray(v) for v in df[t.name]]).reshape(len(df), *t.shape[1:])
                    if len(df) else np.empty((0, *t.shape[1:])) for t in self._inputs}
        if self._single:
            spec = self._inputs[0]
            return {spec.name: df.to_numpy().reshape(len(df), *spec.shape[1:])}
        raise InputError(f"DataFrame columns {list(df.columns)} do not name the model's inputs "
                         f"({self._expected()})")


def _check_tensor(spec, value) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {spec.name!r} is not a rectangular array ({exc}); expected {spec.describe()}")
    expected_dtype = np.dtype(spec.dtype)
    if arr.dtype != expected_dtype:
        if arr.dtype.kind in "OUS" or not np.can_cast(arr.dtype, expected_dtype, casting="same_kind"):
            raise InputError(f"input {spec.name!r} has dtype {arr.dtype}, expected {spec.describe()}")
        arr = arr.astype(expected_dtype)
    if arr.ndim != len(spec.shape) or list(arr.shape[1:]) != list(spec.shape[1:]):
        raise InputError(f"input {spec.name!r} has shape {list(arr.shape)}, expected {spec.describe()}")
    if arr.shape[0] == 0:
        raise InputError(f"input {spec.name!r} is empty (batch 0); expected {spec.describe()}")
    if arr.shape[0] > MAX_BATCH:
        raise InputError(f"input {spec.name!r} has batch {arr.shape[0]}; the model takes at most {MAX_BATCH}")
    return np.ascontiguousarray(arr)


# -- loading with fallback --------------------------------------------------------------------


def read_variants(model_dir, flavor_conf: dict) -> tuple[list, LoadContext]:
    """Every variant record (each ``variant.json`` checked against its digest in MLmodel), with
    benchmarks stored later for other host classes merged in; and the context to load them."""
    from mlflow_chimera.host_benchmark import merge_host_benchmarks

    model_dir = Path(model_dir)
    variants = [Variant.load(variant_dir(model_dir, vid), expected_sha256=entry["variant_json_sha256"])
                for vid, entry in flavor_conf["variants"].items()]
    variants += _published_variants(model_dir, {v.id for v in variants})
    merge_host_benchmarks(variants, model_dir)
    context = LoadContext(model_dir=model_dir, signature=Signature.from_dict(flavor_conf["signature"]),
                          reference_sha256=flavor_conf["reference"]["sha256"],
                          reference_uri=flavor_conf["reference"].get("uri"))
    return variants, context


def _published_variants(model_dir: Path, known_ids: set) -> list:
    """Variants target hosts published for this logged model (tags in the tracking store).
    Without a reachable tracking store the model still loads with its own variants."""
    import yaml

    model_id = yaml.safe_load(Path(model_dir, "MLmodel").read_text()).get("model_id")
    if not model_id:
        return []
    from mlflow_chimera.publish import read_published_variants

    try:
        return read_published_variants(model_id, known_ids)
    except Exception as exc:  # noqa: BLE001 - published variants are an addition, never a must
        _logger.warning("chimera: published variants of %s not read: %s: %s", model_id, type(exc).__name__, exc)
        return []


def load(model_dir, flavor_conf: dict, model_config: dict | None = None) -> ChimeraModel:
    """Rank the model's variants for this host and load the first that verifies and loads."""
    variants, context = read_variants(model_dir, flavor_conf)
    model_dir, signature = context.model_dir, context.signature
    decision = rank(variants, host_mod.fingerprint(), model_config)
    for candidate in decision.candidates:
        variant = candidate.variant
        try:
            runner = load_verified(variant, model_dir, context, check=not decision.forced)
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next candidate
            error = f"{type(exc).__name__}: {exc}"
            _logger.warning("chimera: skipping variant %s: %s", variant.id, error)
            decision.attempts.append((variant.id, error))
            continue
        decision.chosen = variant
        _logger.info("chimera: loaded variant %s", variant.id)
        return ChimeraModel(variant, runner, signature, decision, variants)
    raise RuntimeError("no variant of this model can run on this host.\n" + decision.explain())


def local_variant_dir(variant: Variant, model_dir: Path) -> Path:
    """The variant's files, verified: in the model directory when they are there (a saved
    model), else fetched from artifact storage into the local cache (a logged model)."""
    vdir = variant_dir(model_dir, variant.id)
    if variant.location and not all(Path(vdir, rel).is_file() for rel in variant.files):
        from mlflow_chimera.cache import fetch_dir

        return fetch_dir(variant.location, variant.content_key(), variant.files)
    verify_digests(vdir, variant.files)
    return vdir


def load_verified(variant: Variant, model_dir: Path, context: LoadContext, check: bool):
    """Verify every file's digest, load, and check the outputs on the recorded example."""
    vdir = local_variant_dir(variant, model_dir)
    runner = backend_registry.get(variant.backend).load(variant, vdir, context)
    if check and variant.parity is not None:
        inputs = _load_npz(model_dir / CHECK_INPUTS)
        recorded = _load_npz(model_dir / CHECK_OUTPUTS)
        expected = [recorded[name] for name in context.signature.output_names]
        results = compare_outputs(expected, runner.run(inputs), context.signature.output_names,
                                  variant.parity.tolerance)
        failed = [r for r in results if not r["passed"]]
        if failed:
            raise IntegrityError(f"outputs on the recorded example differ from the reference: "
                                 f"{failed[0]['name']}: {failed[0].get('reason')}")
    return runner


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
