"""Entry point MLflow loads during ``import mlflow`` (group ``mlflow.run_context_provider``).

Loading it registers the ``mlflow.chimera`` alias. As a run context provider it tags each new
run with the host class it ran on (``chimera.host_class``); set ``CHIMERA_DISABLE_RUN_TAGS=1``
to turn that off. It must stay cheap: it runs on every ``import mlflow``.
"""

from __future__ import annotations

import os

from mlflow.tracking.context.abstract_context import RunContextProvider

from mlflow_chimera import _alias

_alias.install()


class HostRunContext(RunContextProvider):
    def in_context(self) -> bool:
        return os.environ.get("CHIMERA_DISABLE_RUN_TAGS", "").lower() not in ("1", "true", "yes")

    def tags(self) -> dict:
        from mlflow_chimera.host import fingerprint

        return {"chimera.host_class": fingerprint().host_class}
