"""The tracking-server registry plugin (``plugins/``, package ``mlflow_chimera_registry``).

Starts ``mlflow server`` on 127.0.0.1 with ``--registry-store-uri chimera+sqlite:///…`` in an
environment where torch, onnxruntime and mlflow_chimera cannot be imported, logs models against
it from this process, registers them the way the UI's *Register model* button does (REST:
``registered-models/create`` then ``model-versions/create`` with ``source=models:/<model_id>``
and ``model_id``) and through the Python client, and checks:

- a chimera model's version gets the LoggedModel's ``chimera.*`` tags (and its description);
- a LoggedModel without chimera tags whose MLmodel has a ``chimera`` flavor gets the facts the
  flavor states, in the same format the library writes;
- a plain pyfunc model's version gets no ``chimera.*`` tag, although its LoggedModel carries
  ``chimera.host_class`` (the library's run context provider tags every LoggedModel);
- the server never tried to import torch or onnxruntime, and the plugin never tried to import
  mlflow_chimera.

The plugin must be installed (``.ci/run`` does it: ``.venv/bin/pip install -e plugins/`` from
the repository root). Without it the tests are skipped, except under ``CI=true``, where they
fail.

Run alone: ``python -m pytest tests/test_registry_plugin.py``.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

import servers

INSTALL = "pip install -e plugins/   (from the repository root)"
SCHEME = "chimera+sqlite"
BLOCKED = ("torch", "onnxruntime", "mlflow_chimera")
CHIMERA_MODEL = "chimera-registry-mlp"
COPIED_MODEL = "chimera-registry-flavor-only"
PLAIN_MODEL = "chimera-registry-plain"
PROMOTED_MODEL = "chimera-registry-promoted"

# The server's processes get this as `sitecustomize` (a directory of its own on PYTHONPATH).
#
# Why: CI's venv has torch, onnxruntime and mlflow_chimera installed — this test process needs
# them to log a chimera model — but a tracking server has none of them, and the plugin promises
# to work there. Python imports `sitecustomize` at start-up in every process of the server
# (`mlflow server` and the uvicorn workers it starts inherit PYTHONPATH); the finder it puts first
# on sys.meta_path makes those packages unimportable, as if not installed (ModuleNotFoundError,
# which optional-import code handles like a missing package), and appends each attempt, with
# the importing stack, to a file the test reads. So the test proves what the server and the
# plugin import, not just that they happen to work.
SITECUSTOMIZE = textwrap.dedent('''
    import json, os, sys, traceback

    _BLOCKED = {blocked!r}
    _LOG = os.environ.get("CHIMERA_BLOCKED_IMPORTS_LOG")


    class _BlockHeavyImports:
        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] not in _BLOCKED:
                return None
            if _LOG:
                stack = [f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()[:-1]]
                with open(_LOG, "a", encoding="utf-8") as out:
                    out.write(json.dumps({{"module": fullname, "pid": os.getpid(), "stack": stack}}) + "\\n")
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (blocked for this test)",
                                      name=fullname)


    sys.meta_path.insert(0, _BlockHeavyImports())
''').format(blocked=BLOCKED)


# -- the plugin must be installed ------------------------------------------------------------


def _unavailable(reason: str):
    """Fail in CI (.ci/run installs the plugin), skip elsewhere — with the reason."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the registry plugin test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _plugin_entry_point():
    from importlib.metadata import entry_points

    for ep in entry_points(group="mlflow.model_registry_store"):
        if ep.name == SCHEME:
            return ep
    return None


# -- the tracking server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` with the chimera registry store, unable to import torch & co."""
    ep = _plugin_entry_point()
    if ep is None:
        _unavailable(f"the registry plugin is not installed (no {SCHEME!r} entry point in "
                     f"mlflow.model_registry_store); install it: {INSTALL}")
    if not ep.value.startswith("mlflow_chimera_registry"):
        _unavailable(f"{SCHEME!r} is provided by {ep.value!r}, not mlflow_chimera_registry")

    root = tmp_path_factory.mktemp("registry-server")
    blocker_dir = root / "sitecustomize"
    blocker_dir.mkdir()
    (blocker_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    blocked_log = root / "blocked-imports.jsonl"
    blocked_log.touch()

    port = servers.free_port()
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the session's store is not this one
        env.pop(key, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker_dir), env.get("PYTHONPATH")]))
    env["CHIMERA_BLOCKED_IMPORTS_LOG"] = str(blocked_log)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: nothing here uses it
    db = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db,
           "--registry-store-uri", f"chimera+{db}", "--default-artifact-root", str(root / "artifacts"),
           "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with servers.running(cmd, port, "/health", env, "mlflow server", timeout=180, cwd=root) as running:
        yield {"url": running.url, "log": Path(running.log_path), "blocked_log": blocked_log,
               "proc": running.proc, "root": root}


# -- talking to it -----------------------------------------------------------------------------


def _api(url: str, endpoint: str, body: dict | None = None) -> dict:
    """POST ``body`` (or GET without one) to ``/api/2.0/mlflow/<endpoint>``."""
    if body is None:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}")
    else:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{endpoint}: HTTP {exc.code}: {exc.read()[:2000]!r}") from exc


def _register_like_the_ui(url: str, name: str, model_id: str) -> dict:
    """What the UI's Register model button sends for a logged model (MLflow 3.17 UI:
    ``createModelVersion({name, source: "models:/<model_id>", run_id, tags, model_id})``)."""
    _api(url, "registered-models/create", {"name": name})
    created = _api(url, "model-versions/create",
                   {"name": name, "source": f"models:/{model_id}", "model_id": model_id, "tags": []})
    return _version(url, name, created["model_version"]["version"])


def _version(url: str, name: str, version: str) -> dict:
    query = urllib.parse.urlencode({"name": name, "version": version})
    mv = _api(url, f"model-versions/get?{query}")["model_version"]
    mv["tags"] = {t["key"]: t["value"] for t in mv.get("tags", [])}
    return mv


def _chimera(tags: dict) -> dict:
    return {k: v for k, v in tags.items() if k.startswith("chimera.")}


@contextmanager
def _tracking_at(url: str):
    """Point this process's MLflow at ``url``; restore the tracking URI (the global and the
    environment variables — tests/conftest.py sets MLFLOW_TRACKING_URI for the session) after."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    try:
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        yield mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    finally:
        mlflow.set_tracking_uri(saved_tracking)  # None: unset, as before
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _plain_model():
    """A tiny non-chimera pyfunc model."""
    import mlflow.pyfunc

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[float], params=None) -> list[float]:
            return [2 * x for x in model_input]

    return Doubler()


@pytest.fixture(scope="module")
def registered(server):
    """Log a chimera MLP, a flavor-only copy of its MLmodel and a plain pyfunc model against the
    server (without registering them), then register each as the UI does, and the chimera
    model once more through the Python client with its artifact location as the source."""
    import mlflow
    import mlflow.chimera  # noqa: F401  (the alias; this process has torch)

    import models

    url = server["url"]
    out = {}
    with _tracking_at(url) as client:
        experiment_id = client.create_experiment("chimera-registry-plugin")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = mlflow.chimera.log_model(models.mlp(), name="mlp", input_example=models.examples()["mlp"],
                                            backends=["onnxruntime"], precisions=["fp32"])
            plain = mlflow.pyfunc.log_model(name="plain", python_model=_plain_model(),
                                            pip_requirements=["mlflow"])  # no requirements inference
        out["run_id"] = run.info.run_id
        out["logged"] = client.get_logged_model(info.model_id)
        out["plain_logged"] = client.get_logged_model(plain.model_id)

        # A LoggedModel with the chimera model's MLmodel and no chimera tags: the plugin must
        # read the flavor (mlflow_chimera is not importable in the server).
        copy = client.create_logged_model(experiment_id, name="flavor-only")
        mlmodel = Path(mlflow.artifacts.download_artifacts(f"{out['logged'].artifact_location}/MLmodel",
                                                           dst_path=str(server["root"] / "copy")))
        client.log_model_artifact(copy.model_id, str(mlmodel))
        out["copy_logged"] = client.get_logged_model(copy.model_id)

        started = time.perf_counter()
        out["ui"] = _register_like_the_ui(url, CHIMERA_MODEL, info.model_id)
        out["copy"] = _register_like_the_ui(url, COPIED_MODEL, copy.model_id)
        out["plain"] = _register_like_the_ui(url, PLAIN_MODEL, plain.model_id)
        out["register_seconds"] = time.perf_counter() - started
        # A version made from another version (no model_id: the SQL registry keeps none).
        _api(url, "registered-models/create", {"name": PROMOTED_MODEL})
        created = _api(url, "model-versions/create",
                       {"name": PROMOTED_MODEL, "source": f"models:/{CHIMERA_MODEL}/{out['ui']['version']}"})
        out["promoted"] = _version(url, PROMOTED_MODEL, created["model_version"]["version"])

        # The Python client, with the artifact location as the source and one chimera tag of
        # its own, which must win over the copied one.
        mv = client.create_model_version(CHIMERA_MODEL, source=out["logged"].artifact_location,
                                         run_id=run.info.run_id, model_id=info.model_id,
                                         tags={"chimera.version": "given-in-the-request"})
        out["client"] = _version(url, CHIMERA_MODEL, mv.version)
    return out


# -- the checks --------------------------------------------------------------------------------


@pytest.mark.slow  # a real mlflow server
def test_ui_registration_copies_the_logged_models_chimera_tags(registered):
    logged_tags = _chimera(registered["logged"].tags)
    for key in ("chimera.reference_sha256", "chimera.variants", "chimera.build_host_class",
                "chimera.built_with", "chimera.version"):
        assert key in logged_tags, f"log_model did not tag the LoggedModel with {key}: {sorted(logged_tags)}"
    assert any(k.startswith("chimera.status.") for k in logged_tags)
    assert any(k.startswith("chimera.fastest.") for k in logged_tags)

    version_tags = _chimera(registered["ui"]["tags"])
    expected = {k: v for k, v in logged_tags.items() if k != "chimera.host_class"}
    assert version_tags == expected
    assert "onnxruntime-fp32-cpu" in version_tags["chimera.variants"]
    assert all(len(v) <= 5000 for v in version_tags.values())
    # The description the library wrote on the LoggedModel comes along (the version page shows
    # only the first few tags).
    note = registered["logged"].tags.get("mlflow.note.content")
    if note and note.startswith("**mlflow-chimera**"):
        assert registered["ui"].get("description") == note


@pytest.mark.slow  # a real mlflow server
def test_python_client_registration_by_artifact_location(registered):
    logged_tags = _chimera(registered["logged"].tags)
    version_tags = _chimera(registered["client"]["tags"])
    assert version_tags["chimera.version"] == "given-in-the-request"  # the request's own tag wins
    assert version_tags["chimera.reference_sha256"] == logged_tags["chimera.reference_sha256"]
    assert version_tags["chimera.variants"] == logged_tags["chimera.variants"]
    assert set(version_tags) == set(logged_tags) - {"chimera.host_class"}


@pytest.mark.slow  # a real mlflow server
def test_version_from_a_version_gets_its_chimera_tags(registered):
    assert _chimera(registered["promoted"]["tags"]) == _chimera(registered["ui"]["tags"])


@pytest.mark.slow  # a real mlflow server
def test_flavor_only_model_gets_the_facts_its_mlmodel_states(registered):
    assert not any(k in registered["copy_logged"].tags
                   for k in ("chimera.reference_sha256", "chimera.variants"))
    logged_tags = registered["logged"].tags
    version_tags = _chimera(registered["copy"]["tags"])
    keys = ("chimera.reference_sha256", "chimera.variants", "chimera.build_host_class", "chimera.version")
    assert version_tags == {k: logged_tags[k] for k in keys}  # same facts, same format as the library's


@pytest.mark.slow  # a real mlflow server
def test_non_chimera_model_gets_no_chimera_tags(registered):
    # The LoggedModel was created in this process, where mlflow_chimera's run context provider
    # tags every LoggedModel with chimera.host_class (unless CHIMERA_DISABLE_RUN_TAGS is set):
    # that tag alone must not make it a chimera model.
    assert not _chimera(registered["plain"]["tags"])
    assert not (registered["plain"].get("description") or "").startswith("**mlflow-chimera**")


@pytest.mark.slow  # a real mlflow server
def test_server_never_imported_torch_onnxruntime_or_the_library(server, registered):
    assert server["proc"].poll() is None, server["log"].read_text()[-3000:]
    attempts = [json.loads(line) for line in server["blocked_log"].read_text().splitlines() if line]
    heavy = [a for a in attempts if a["module"].partition(".")[0] in ("torch", "onnxruntime")]
    assert not heavy, "the server tried to import " + ", ".join(sorted({a["module"] for a in heavy}))
    by_plugin = [a for a in attempts if any("mlflow_chimera_registry" in f for f in a["stack"])]
    assert not by_plugin, f"the registry plugin tried to import {sorted({a['module'] for a in by_plugin})}"
    # mlflow_chimera is installed in this venv (not on a real tracking server), so MLflow's own
    # plugin discovery tries to load its entry points: the run context provider during `import
    # mlflow`, the models:/ artifact repository when the server sets up artifact stores. Those
    # are the only imports of it allowed, and they fail harmlessly (MLflow warns and goes on).
    discovery = ("mlflow/tracking/context/registry.py", "mlflow/store/artifact/artifact_repository_registry.py")
    for a in attempts:
        assert any("importlib/metadata" in f for f in a["stack"]) and \
            any(d in f for f in a["stack"] for d in discovery), \
            f"unexpected import of {a['module']} in the server:\n" + "\n".join(a["stack"][-12:])


# -- in process: dispatch, limits, and failures that must not fail a registration ---------------


@pytest.fixture
def plugin():
    if _plugin_entry_point() is None:
        _unavailable(f"the registry plugin is not installed; install it: {INSTALL}")
    from mlflow_chimera_registry import store

    return store


def test_the_plugins_vocabulary_is_the_librarys(plugin):
    """The plugin runs on tracking servers without the library, so it keeps its own copy of the
    words, tag names and limits the library writes; this keeps the two from drifting."""
    from mlflow_chimera import summary, tracking
    from mlflow_chimera.flavor import FLAVOR_NAME

    assert plugin.STATUS_WORDS == summary.STATUS_WORDS
    assert plugin.TAG_PREFIX == tracking.TAG_PREFIX
    assert plugin.DESCRIPTION_MARK == tracking.DESCRIPTION_MARK
    assert plugin.MAX_TAG_VALUE == tracking.MAX_TAG_VALUE
    assert plugin.FLAVOR == FLAVOR_NAME


def test_tag_values_are_clipped_checked_and_request_tags_win(plugin):
    tags = plugin._valid_tags({"chimera.long": "x" * 6000, "chimera.kept": "v", "chimera.given": "copied",
                               "chimera.none": None, "bad/../key": "v"}, skip={"chimera.given"})
    assert tags == {"chimera.long": "x" * 4999 + "…", "chimera.kept": "v"}


def test_tagging_failure_never_fails_registration(plugin, tmp_path, monkeypatch, caplog):
    from mlflow.tracking._model_registry.utils import _get_store

    db = f"sqlite:///{tmp_path / 'registry.db'}"
    store = _get_store(f"chimera+{db}", tracking_uri=db)  # MLflow's client-side dispatch
    assert isinstance(store, plugin.ChimeraTagging)

    def unreachable(self, model_id):
        raise ConnectionError("tracking store unreachable")

    monkeypatch.setattr(plugin.ChimeraTagging, "_chimera_logged_model", unreachable)
    store.create_registered_model("chimera-registry-failure")
    with caplog.at_level("WARNING", logger="mlflow_chimera_registry"):
        mv = store.create_model_version("chimera-registry-failure", source=str(tmp_path), run_id="r",
                                        model_id="m-0123", tags=[])
    assert mv.version == 1 and not _chimera(mv.tags)
    assert "tracking store unreachable" in caplog.text
