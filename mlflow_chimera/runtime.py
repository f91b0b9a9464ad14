"""A loaded chimera model: the chosen variant's runner behind input checking, plus the
decision that chose it. This is what ``get_raw_model()`` returns."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException

from mlflow_chimera import backends as backend_registry
from mlflow_chimera import host as host_mod
from mlflow_chimera.backends.base import LoadContext
from mlflow_chimera.batching import BatchingConfig, DynamicBatcher
from mlflow_chimera.cache import CACHE_ENV, CacheError, CacheSpaceError, fetch_dir
from mlflow_chimera import trust as trust_mod
from mlflow_chimera.catalog import read_catalog, verify_checks
from mlflow_chimera.compile.parity import compare_outputs, tolerance_for
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
                 variants: list, batching: BatchingConfig | None = None):
        self.variant = variant
        # Concurrent predict calls merged into batches (batching.py), when switched on.
        self.batcher = DynamicBatcher(runner.run, batching) if batching else None
        self.variants = variants  # every variant of the model, chosen or not
        self.runner = runner
        self.signature = signature
        self.decision = decision
        self._inputs = signature.inputs
        self._single = len(signature.inputs) == 1
        self._output_names = signature.output_names
        self._structure = signature.structure
        self._signature = signature
        # An array the runner can take as it is: (dtype, shape after the batch axis), for a
        # single input without dynamic axes; predict then skips the general checks.
        spec = signature.inputs[0]
        self._as_is = (np.dtype(spec.dtype), tuple(spec.shape[1:])) \
            if self._single and not signature.dynamic_axes and -1 not in spec.shape[1:] else None

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
        named = self._named_inputs(data)
        outputs = self.batcher.submit(named) if self.batcher else self.runner.run(named)
        if self._structure == "tensor":
            return outputs[0]
        return dict(zip(self._output_names, outputs))

    # -- input checking ----------------------------------------------------------------

    def _expected(self) -> str:
        return "; ".join(t.describe() for t in self._inputs)

    def _named_inputs(self, data) -> dict:
        if self._as_is is not None and type(data) is np.ndarray and data.dtype == self._as_is[0] \
                and data.shape[1:] == self._as_is[1] and data.flags.c_contiguous and 0 < data.shape[0] <= MAX_BATCH:
            return {self._inputs[0].name: data}  # fast path: already exactly what the runner takes
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
        sizes = {}
        for name, axes in self._signature.dynamic_axes.items():
            for axis, label in axes.items():
                sizes.setdefault(label, {})[f"{name}[{axis}]"] = checked[name].shape[int(axis)]
        for label, seen in sizes.items():
            if len(set(seen.values())) > 1:
                raise InputError(f"dynamic axis {label!r} has different sizes {seen}; they must agree")
            low, high = self._signature.axis_ranges.get(label, (1, MAX_BATCH))
            size = next(iter(seen.values()))
            if not low <= size <= high:
                raise InputError(f"dynamic axis {label!r} has size {size}; the model takes {low} to {high}")
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
            return {t.name: _rows(t, [np.asarray(v) for v in df[t.name]]) for t in self._inputs}
        if self._single:
            spec = self._inputs[0]
            return {spec.name: _rows(spec, list(df.to_numpy()))}
        raise InputError(f"DataFrame columns {list(df.columns)} do not name the model's inputs "
                         f"({self._expected()})")


def _rows(spec, rows: list) -> np.ndarray:
    """One array from a DataFrame column's cells (one example per row)."""
    if not rows:
        return np.empty((0, *[max(d, 0) for d in spec.shape[1:]]))
    stacked = np.stack(rows)
    if -1 in spec.shape[1:]:
        return stacked
    return stacked.reshape(len(rows), *spec.shape[1:])


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
    if not spec.accepts(arr.shape):
        raise InputError(f"input {spec.name!r} has shape {list(arr.shape)}, expected {spec.describe()}")
    if arr.shape[0] == 0:
        raise InputError(f"input {spec.name!r} is empty (batch 0); expected {spec.describe()}")
    if arr.shape[0] > MAX_BATCH:
        raise InputError(f"input {spec.name!r} has batch {arr.shape[0]}; the model takes at most {MAX_BATCH}")
    return np.ascontiguousarray(arr)


# -- loading with fallback --------------------------------------------------------------------


def read_variants(model_dir, flavor_conf: dict, source=None, include_published: bool = True) -> tuple[list, LoadContext]:
    """Every variant record that counts (see :mod:`mlflow_chimera.catalog`) and the context to
    load them — for listing and benchmarking; loading goes through :func:`load`."""
    catalog = read_catalog(model_dir, flavor_conf, source=source, include_published=include_published)
    return catalog.variants, catalog.context


def load(model_dir, flavor_conf: dict, model_config: dict | None = None, source=None,
         policy: trust_mod.Policy | None = None) -> ChimeraModel:
    """Rank the model's variants for this host and load the first that verifies and loads."""
    policy = policy or trust_mod.Policy.from_settings()
    source = source or trust_mod.requested_source()
    batching = BatchingConfig.from_setting((model_config or {}).get("batching"), MAX_BATCH)
    catalog = read_catalog(model_dir, flavor_conf, policy=policy, source=source)
    verify_checks(Path(model_dir), flavor_conf)
    variants, context = catalog.variants, catalog.context
    decision = rank(variants, host_mod.fingerprint(), model_config, refused=catalog.refused,
                    trust=catalog.trust.how)
    cache_errors = []
    for candidate in decision.candidates:
        variant = candidate.variant
        try:
            runner = load_verified(variant, context.model_dir, context, check=not decision.forced)
        except LOAD_FAILURES as exc:  # the next candidate may load; a bug elsewhere still raises
            error = f"{type(exc).__name__}: {exc}"
            _logger.warning("chimera: skipping variant %s: %s", variant.id, error)
            decision.attempts.append((variant.id, error))
            if isinstance(exc, CacheError):
                cache_errors.append(exc)
            continue
        decision.chosen = variant
        _logger.info("chimera: loaded variant %s (%s)", variant.id, catalog.how_trusted.get(variant.id, ""))
        return ChimeraModel(variant, runner, context.signature, decision, variants, batching)
    raise NoVariantError(f"no variant of this model can run on this host{_cache_cause(cache_errors)}.\n"
                         + decision.explain(), decision)


def _cache_cause(errors: list) -> str:
    """': <the local disk's problem>' when candidates failed for want of cache space or a
    writable cache directory: that, not the variants, is what an operator has to fix."""
    space = [e for e in errors if isinstance(e, CacheSpaceError)]
    if space:
        least = min(space, key=lambda e: (e.needed is None, e.needed))
        need = "" if least.needed is None else f"; the smallest variant tried needs {least.needed} bytes"
        return (f": the cache directory {least.directory} is too full ({least.free} bytes free{need}); "
                f"free space there or set {CACHE_ENV} to a larger volume")
    return f": {errors[0]}" if errors else ""


class NoVariantError(RuntimeError):
    """No variant of the model could be loaded here; the message is the full explanation,
    ``decision`` the ranking and what each attempt raised."""

    def __init__(self, message: str, decision: Decision | None = None):
        super().__init__(message)
        self.decision = decision


# What a failed candidate may raise: integrity and trust refusals, a store or disk that fails,
# a runtime that refuses the file. Anything else is a bug and is not hidden behind a fallback.
LOAD_FAILURES = (IntegrityError, trust_mod.TrustError, OSError, RuntimeError, ValueError, ImportError,
                 MemoryError, backend_registry.UnknownBackendError, MlflowException)  # + MLflow's download errors


def local_variant_dir(variant: Variant, model_dir: Path) -> Path:
    """The variant's files, verified: in the model directory when they are there (a saved
    model), else fetched from artifact storage into the local cache (a logged model)."""
    vdir = variant_dir(model_dir, variant.id)
    if variant.location and not all(Path(vdir, rel).is_file() for rel in variant.files):
        return fetch_dir(variant.location, variant.content_key(), variant.files,
                         size=variant.provenance.get("size_bytes"))
    verify_digests(vdir, variant.files)
    return vdir


def load_verified(variant: Variant, model_dir: Path, context: LoadContext, check: bool,
                  tolerances: dict | None = None):
    """Verify every file's digest, load, and check the outputs on the recorded example with
    the loading side's tolerance for the variant's precision (never the record's own)."""
    vdir = local_variant_dir(variant, model_dir)
    runner = backend_registry.get(variant.backend).load(variant, vdir, context)
    if check and variant.parity is not None:
        inputs = _load_npz(model_dir / CHECK_INPUTS)
        recorded = _load_npz(model_dir / CHECK_OUTPUTS)
        expected = [recorded[name] for name in context.signature.output_names]
        results = compare_outputs(expected, runner.run(inputs), context.signature.output_names,
                                  tolerance_for(variant.precision, tolerances))
        failed = [r for r in results if not r["passed"]]
        if failed:
            raise IntegrityError(f"outputs on the recorded example differ from the reference beyond the "
                                 f"{variant.precision} tolerance: {failed[0]['name']}: {failed[0].get('reason')}")
    return runner


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
