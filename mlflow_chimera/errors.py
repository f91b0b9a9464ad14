"""Errors a user can act on. Each message is one line that names what was wrong and what was
expected; the CLI prints it without a traceback. Internal errors keep theirs."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class ChimeraError(MlflowException):
    """A user error: bad input, a model that cannot be served, a refused variant."""

    def __init__(self, message: str, error_code=INVALID_PARAMETER_VALUE, **kwargs):
        super().__init__(message, error_code=error_code, **kwargs)


class NothingUsableError(ChimeraError):
    """``log_model``/``save_model`` built no variant that can be served."""
