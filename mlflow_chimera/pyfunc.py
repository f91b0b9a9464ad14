"""The ``python_function`` entry point: ``_load_pyfunc`` and the pyfunc wrapper.

MLflow calls ``mlflow_chimera._load_pyfunc(path, model_config)`` (the ``loader_module`` in
MLmodel). ``mlflow models serve`` calls ``predict`` from several threads at once; the wrapper
keeps no per-call state.
"""

from __future__ import annotations

import inspect

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.model_utils import _get_flavor_configuration

from mlflow_chimera import FLAVOR_NAME, runtime


class ChimeraPyfunc:
    """pyfunc face of a :class:`~mlflow_chimera.runtime.ChimeraModel`."""

    def __init__(self, model: runtime.ChimeraModel):
        self._model = model

    def predict(self, data, params=None):
        try:
            return self._model.predict(data)
        except runtime.InputError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def get_raw_model(self) -> runtime.ChimeraModel:
        return self._model


# MLflow's PyFuncModel asks inspect.signature(predict) on every call (does it take params?);
# a stored signature answers without parsing the function each time.
ChimeraPyfunc.predict.__signature__ = inspect.signature(ChimeraPyfunc.predict)


def _load_pyfunc(path, model_config=None) -> ChimeraPyfunc:
    """Load the fastest valid variant of the chimera model at ``path`` for this host.

    ``model_config`` may force ``{"variant": id}``, restrict ``{"backend": …}``, or opt in to
    lower accuracy with ``{"precision": …}``, ``{"accuracy": "any"}`` or ``{"max_abs_err": …}``
    ("auto" means the default; see :mod:`mlflow_chimera.selection`).
    """
    conf = _get_flavor_configuration(model_path=path, flavor_name=FLAVOR_NAME)
    try:
        return ChimeraPyfunc(runtime.load(path, conf, model_config))
    except ValueError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
