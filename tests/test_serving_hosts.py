"""Serving hosts as operators run them: a read-only cache directory (empty, or filled at image
build with ``chimera prefetch``), no writable place at all, and a cache volume too small for
some or all variants. The file systems are real mounts (a read-only bind mount, a small tmpfs);
without the right to mount (not root) these tests are skipped.

The model is a small CNN logged to the session's sqlite store with ONNX Runtime fp32 (about
270 KB) and int8 (about 85 KB), loaded by its ``models:/`` URI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from click.testing import CliRunner

import models
import servers
from mlflow_chimera import cache
from mlflow_chimera.cli import cli
from mlflow_chimera.runtime import NoVariantError

FP32, INT8 = "onnxruntime-fp32-cpu", "onnxruntime-int8-cpu"
TOLERANCE = {"fp32": 1e-4, "int8": 0.15}


# -- mounts -----------------------------------------------------------------------------------


def _mount(*args) -> None:
    try:
        done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"these tests mount file systems and cannot run `mount` here: {exc}")
    if done.returncode:
        pytest.skip(f"these tests mount file systems (run as root); `mount {' '.join(map(str, args))}` "
                    f"failed: {done.stderr.strip()}")


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # busy: detach now, free later


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` bind-mounted onto itself, read-only, for the block."""
    _mount("--bind", folder, folder)
    try:
        _mount("-o", "remount,bind,ro", folder)
        yield folder
    finally:
        _unmount(folder)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (e.g. "64k") at ``folder``, for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder)
    try:
        yield folder
    finally:
        _unmount(folder)


# -- the model and the process's cache state ----------------------------------------------------


@dataclass
class Logged:
    uri: str
    torch_model: object
    sizes: dict  # variant id -> bytes of its files (provenance["size_bytes"])
    ranking: list  # variant ids in the order this host tries them, fp32 and int8 accepted


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> None:
    """Skip (before logging any model) where this process may not mount file systems."""
    with small_tmpfs(tmp_path_factory.mktemp("probe-mount"), "4k"):
        pass


@pytest.fixture(scope="module")
def cnn(mountable, logged, tmp_path_factory) -> Logged:
    info, torch_model, _, name = logged.get("cnn", backends=["onnxruntime"], precisions=["fp32", "int8"])
    uri = f"models:/{name}/1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHIMERA_CACHE_DIR", str(tmp_path_factory.mktemp("probe-cache")))
        raw = mlflow.pyfunc.load_model(uri, model_config={"precision": "fp32,int8"}).get_raw_model()
    sizes = {v.id: v.provenance["size_bytes"] for v in raw.variants}
    return Logged(uri, torch_model, sizes, [c.variant.id for c in raw.decision.candidates])


@pytest.fixture(autouse=True)
def process_cache(monkeypatch):
    """Each test starts as a fresh process would: no private fallback directory yet, nothing
    warned about; a fallback made here is removed afterwards."""
    monkeypatch.setattr(cache, "_scratch", None)
    monkeypatch.setattr(cache, "_warned", set())
    yield
    if cache._scratch is not None:
        shutil.rmtree(cache._scratch, ignore_errors=True)


def _check_predictions(loaded, torch_model) -> None:
    x = models.examples(batch=3, seed=11)["cnn"]
    precision = loaded.get_raw_model().variant.precision
    np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(torch_model, x)[0],
                               atol=TOLERANCE[precision])


def _cache_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]


def _leftovers(root: Path) -> list:
    """Anything a fetch left in ``root`` (the remembered-anchor records that loading writes
    beside the payloads are not fetches)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".fetch-") or (p.is_file() and p.relative_to(root).parts[0] != "anchors"))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# -- read-only cache directories ---------------------------------------------------------------


def test_empty_read_only_cache_still_serves_and_says_so_once(cnn, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    with read_only(folder):
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(folder))
        with caplog.at_level(logging.WARNING, logger="mlflow.chimera"):
            first = mlflow.pyfunc.load_model(cnn.uri)
            second = mlflow.pyfunc.load_model(cnn.uri)
        assert list(folder.iterdir()) == []
    warnings = _cache_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(folder) in warnings[0] and "CHIMERA_CACHE_DIR" in warnings[0]
    assert not [r for r in caplog.records if "skipping variant" in r.getMessage()]
    variant = first.get_raw_model().variant
    assert variant.id == FP32 == second.get_raw_model().variant.id
    scratch = cache._scratch
    assert scratch.parent == Path(tempfile.gettempdir()) and scratch.name.startswith("chimera-cache-")
    assert (scratch / "variants" / variant.content_key()).is_dir()
    _check_predictions(first, cnn.torch_model)
    _check_predictions(second, cnn.torch_model)


def test_warm_cache_remounted_read_only_is_read_without_writing(cnn, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(folder))
    warm = mlflow.pyfunc.load_model(cnn.uri).get_raw_model().variant
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    with read_only(folder):
        with caplog.at_level(logging.WARNING, logger="mlflow.chimera"):
            loaded = mlflow.pyfunc.load_model(cnn.uri)
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert loaded.get_raw_model().variant.id == warm.id
    assert _cache_warnings(caplog) == [] and cache._scratch is None  # nothing had to be fetched
    _check_predictions(loaded, cnn.torch_model)


def test_no_writable_place_is_one_line_naming_the_directories_tried(cnn, tmp_path, monkeypatch):
    model_dir = Path(mlflow.artifacts.download_artifacts(cnn.uri, dst_path=str(tmp_path)))
    folder = tmp_path / "cache"
    folder.mkdir()
    with read_only(folder):
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(folder))
        monkeypatch.setattr(tempfile, "tempdir", str(folder))  # TMPDIR read-only too
        with pytest.raises(NoVariantError) as failure:
            mlflow.pyfunc.load_model(str(model_dir))
    first_line = str(failure.value).splitlines()[0]
    assert "no writable cache directory" in first_line and "CHIMERA_CACHE_DIR" in first_line
    assert first_line.count(str(folder)) == 2  # the cache directory and the temporary directory
    assert "Read-only file system" in first_line


# -- full cache volumes --------------------------------------------------------------------------


def test_nothing_fits_names_the_directory_and_the_bytes(cnn, tmp_path, monkeypatch):
    with small_tmpfs(tmp_path / "small", "64k") as small:
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(small))
        with pytest.raises(NoVariantError) as failure:
            mlflow.pyfunc.load_model(cnn.uri)  # fp32 only by default: ~270 KB each
        free = shutil.disk_usage(small).free
        assert _leftovers(small) == []
    message = str(failure.value)
    first_line = message.splitlines()[0]
    assert f"the cache directory {small} is too full" in first_line
    assert f"needs {cnn.sizes[FP32]} bytes" in first_line and "bytes free" in first_line
    assert (f"skipped {FP32}: failed to load: CacheSpaceError: not enough space in {small} for {FP32}: "
            f"needs {cnn.sizes[FP32]} bytes") in message
    assert f"{free} bytes" in message


def test_forced_variant_that_does_not_fit_is_refused_for_the_disk(cnn, tmp_path, monkeypatch):
    with small_tmpfs(tmp_path / "small", "160k") as small:
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(small))
        with pytest.raises(NoVariantError, match=f"cache directory {small} is too full"):
            mlflow.pyfunc.load_model(cnn.uri, model_config={"variant": FP32})
        loaded = mlflow.pyfunc.load_model(cnn.uri, model_config={"variant": INT8})
        assert loaded.get_raw_model().variant.id == INT8
        _check_predictions(loaded, cnn.torch_model)


def test_selection_moves_on_to_a_variant_that_fits(cnn, tmp_path, monkeypatch):
    if cnn.ranking.index(INT8) == 0:
        pytest.skip(f"{INT8} ranks first on this host, so no larger variant is tried before it")
    with small_tmpfs(tmp_path / "small", "160k") as small:
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(small))
        loaded = mlflow.pyfunc.load_model(cnn.uri, model_config={"precision": "fp32,int8"})
        raw = loaded.get_raw_model()
        assert raw.variant.id == INT8
        assert _leftovers(small) == [f"variants/{raw.variant.content_key()}/model.onnx"]
    explained = raw.explain()
    for vid in cnn.ranking[:cnn.ranking.index(INT8)]:
        assert (f"skipped {vid}: failed to load: CacheSpaceError: not enough space in {small} for {vid}: "
                f"needs {cnn.sizes[vid]} bytes") in explained
    _check_predictions(loaded, cnn.torch_model)


def test_fetch_that_fills_the_disk_leaves_nothing_and_says_why(cnn, tmp_path, monkeypatch):
    """Without a recorded size nothing is checked first: the download runs into the full disk,
    MLflow reports a download error about the path, and the cache reports the space."""
    raw = mlflow.pyfunc.load_model(cnn.uri).get_raw_model()  # the session's cache
    variant = raw.variant
    with small_tmpfs(tmp_path / "small", "64k") as small:
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(small))
        with pytest.raises(cache.CacheSpaceError) as failure:
            cache.fetch_dir(variant.location, variant.content_key(), variant.files)
        assert _leftovers(small) == []
    error = failure.value
    assert type(error.__cause__).__name__ == "MlflowException"  # what MLflow raised for the full disk
    assert error.errno == errno.ENOSPC and error.directory == small
    assert error.needed == cnn.sizes[variant.id] and error.free <= 64 * 1024


def test_out_of_space_error_from_the_store_leaves_nothing(tmp_path, monkeypatch):
    """A store client that raises ENOSPC itself (no mount needed)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(root))

    def half_written(uri, dst):
        Path(dst, "model.onnx").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_download", half_written)
    monkeypatch.setattr(cache, "_listed_size", lambda *a: None)
    with pytest.raises(cache.CacheSpaceError, match=f"not enough space in {root} for v1: ran out while fetching"):
        cache.fetch_dir("runs:/0123/chimera/variants/v1", "a" * 64, {"model.onnx": "b" * 64})
    assert _leftovers(root) == []


# -- chimera prefetch ----------------------------------------------------------------------------


def test_prefetched_cache_serves_from_a_read_only_mount(cnn, tmp_path, monkeypatch, caplog):
    baked = tmp_path / "baked"
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "not-this-one"))  # --cache-dir wins
    result = invoke("prefetch", cnn.uri, "--cache-dir", baked)
    assert result.exit_code == 0, result.output
    assert f"cache: {baked}" in result.stdout and f"this host loads: {FP32}" in result.stdout
    assert FP32 in result.stdout and "fetched" in result.stdout
    assert not (tmp_path / "not-this-one").exists()
    with read_only(baked):
        monkeypatch.setenv("CHIMERA_CACHE_DIR", str(baked))
        with caplog.at_level(logging.WARNING, logger="mlflow.chimera"):
            loaded = mlflow.pyfunc.load_model(cnn.uri)
    assert loaded.get_raw_model().variant.id == FP32
    assert _cache_warnings(caplog) == [] and cache._scratch is None  # served from the baked cache
    _check_predictions(loaded, cnn.torch_model)


def test_prefetch_all_fetches_every_variant_that_can_run_here(cnn, tmp_path, monkeypatch, caplog):
    baked = tmp_path / "baked"
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(baked))
    result = invoke("prefetch", cnn.uri, "--all", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["loads"] == FP32 and report["cache_dir"] == str(baked) and report["not_fetched"] == {}
    fetched = " ".join(e["what"] for e in report["entries"])
    assert FP32 in fetched and INT8 in fetched
    assert all(e["fetched"] and Path(e["path"]).is_relative_to(baked) for e in report["entries"])
    assert {e["bytes"] for e in report["entries"]} == {cnn.sizes[FP32], cnn.sizes[INT8]}
    with read_only(baked):
        loaded = mlflow.pyfunc.load_model(cnn.uri, model_config={"precision": "int8"})
    assert loaded.get_raw_model().variant.id == INT8 and cache._scratch is None
    _check_predictions(loaded, cnn.torch_model)


def test_prefetch_into_a_read_only_directory_is_a_one_line_error(cnn, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    with read_only(folder):
        result = invoke("prefetch", cnn.uri, "--cache-dir", folder)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: cannot prefetch into {folder}: Read-only file system"


# -- mlflow models serve ------------------------------------------------------------------------


@pytest.mark.serve
@pytest.mark.slow
def test_models_serve_with_an_empty_read_only_cache(cnn, tmp_path, tracking_uri):
    folder, tmp = tmp_path / "cache", tmp_path / "tmp"
    folder.mkdir()
    tmp.mkdir()  # the server's TMPDIR, where its private fallback goes
    with read_only(folder):
        env = servers.venv_env({"MLFLOW_TRACKING_URI": tracking_uri, "CHIMERA_CACHE_DIR": str(folder),
                                "TMPDIR": str(tmp)})
        port = servers.free_port()
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", cnn.uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
        with servers.running(cmd, port, "/ping", env, "mlflow models serve", timeout=120) as server:
            x = models.examples(batch=2, seed=5)["cnn"]
            resp = requests.post(f"{server.url}/invocations", json={"inputs": x.tolist()}, timeout=30)
            assert resp.status_code == 200, resp.text
            np.testing.assert_allclose(np.asarray(resp.json()["predictions"], dtype=np.float32),
                                       models.eager_outputs(cnn.torch_model, x)[0], atol=1e-4)
            log = server.output()
            fetched = [p.name for p in tmp.glob("chimera-cache-*/variants/*/*")]
        assert list(folder.iterdir()) == []
    assert log.count("cannot be written") == 1, log[-3000:]
    assert f"the cache directory {folder} cannot be written" in log
    assert f"loaded variant {FP32}" in log and "skipping variant" not in log
    assert fetched == ["model.onnx"]
