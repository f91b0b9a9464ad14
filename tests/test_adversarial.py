"""The adversarial suite: three attackers, each on their own, against the default trust setting.

* **artifact store**: rewrites files in the store (payloads, ``variant.json``, MLmodel, check
  files, host benchmarks), digests included;
* **tracking database**: rewrites tags (anchors, published variants), and may log its own runs;
* **author of a shared model directory**: hands someone a ``save_model`` directory.

Each case asserts what the loader does instead: refuses with the reason named (in ``explain()``
or the error), never runs the attacker's code (a marker file the exploit would write stays
absent), never answers wrong, never reads or writes outside its directories. Every test restores
what it tampered with; models live in the session's temporary tracking store. Cases that need
native-code variants (AOTInductor, torch.compile: tens of seconds to build) are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import models
from mlflow_chimera.manifest import IntegrityError, sha256_file
from mlflow_chimera.reference import validate_archive
from mlflow_chimera.trust import ANCHOR_TAG, BENCHMARK_ANCHOR_PREFIX, TrustError

MARKER = Path("/tmp/chimera-adversarial-pwned")


class _Exploit:
    """Unpickling this runs a shell command that creates :data:`MARKER`."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A fresh cache for each test (a verified copy must not hide an attack) and no marker."""
    monkeypatch.setenv("CHIMERA_CACHE_DIR", str(tmp_path / "cache"))
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "the attacker's code ran"


@contextlib.contextmanager
def restored(*paths):
    """Put back every file under ``paths`` (and remove new ones) afterwards."""
    saved = {}
    for path in map(Path, paths):
        saved.update({p: p.read_bytes() for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()})
    try:
        yield
    finally:
        for path in map(Path, paths):
            for p in ([path] if path.is_file() else path.rglob("*")):
                if p.is_file() and p not in saved:
                    p.unlink()
        for p, data in saved.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


@contextlib.contextmanager
def restored_tags(model_id):
    client = MlflowClient()
    before = dict(client.get_logged_model(model_id).tags)
    try:
        yield client
    finally:
        after = client.get_logged_model(model_id).tags
        for key in set(after) - set(before):
            client.delete_logged_model_tag(model_id, key)
        client.set_logged_model_tags(model_id, before)


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


class Victim:
    """A logged model and where its pieces live in the store."""

    def __init__(self, info, model, example, name):
        self.info, self.model, self.example, self.name = info, model, example, name
        self.model_id = info.model_id
        self.uri = f"models:/{name}/1"
        self.model_dir = _local(MlflowClient().get_logged_model(self.model_id).artifact_location)
        self.run_store = _local(mlflow.get_run(info.run_id).info.artifact_uri)

    def payload(self, variant_id) -> Path:
        return self.run_store / "chimera" / "variants" / variant_id

    def record(self, variant_id) -> Path:
        return self.model_dir / "variants" / variant_id / "variant.json"

    def rewrite_chain(self, variant_id, filename, data: bytes, **record_changes):
        """The artifact-store attacker's best move: replace a payload file and fix every digest
        the store holds (variant.json, MLmodel)."""
        (self.payload(variant_id) / filename).write_bytes(data)
        _fix_record(self.record(variant_id), self.model_dir / "MLmodel", variant_id,
                    {filename: sha256_file(self.payload(variant_id) / filename)}, record_changes)

    def predict_ok(self, loaded, precision="fp32"):
        x = models.examples(batch=3, seed=5)["cnn"]
        tol = 1e-4 if precision == "fp32" else 0.15
        np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(self.model, x)[0], atol=tol)


def _fix_record(record: Path, mlmodel: Path, variant_id: str, files: dict, changes: dict) -> None:
    data = json.loads(record.read_text())
    data["files"].update(files)
    for key, value in changes.items():
        data[key] = value
    record.write_text(json.dumps(data))
    _set_in_mlmodel(mlmodel, lambda conf: conf["variants"][variant_id].update(
        variant_json_sha256=sha256_file(record)))


def _set_in_mlmodel(mlmodel: Path, change) -> None:
    doc = yaml.safe_load(mlmodel.read_text())
    change(doc["flavors"]["chimera"])
    mlmodel.write_text(yaml.safe_dump(doc))


@pytest.fixture(scope="module")
def victim(tracking_uri):
    """A CNN logged with ONNX Runtime (fp32, int8) and the eager reference."""
    model = models.cnn()
    example = models.examples()["cnn"]
    info = mlflow.chimera.log_model(model, name="victim", input_example=example,
                                    registered_model_name="victim", backends=["onnxruntime", "eager"])
    return Victim(info, model, example, "victim")


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """A ``save_model`` directory as its author hands it over (payloads inside)."""
    path = tmp_path_factory.mktemp("shared") / "model"
    model = models.cnn()
    mlflow.chimera.save_model(model, path, input_example=models.examples()["cnn"],
                              backends=["onnxruntime", "eager"])
    return path, model


@pytest.fixture
def shared_copy(shared_dir, tmp_path):
    path, model = shared_dir
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    return copy, model


def _explain_or_error(load):
    try:
        return load().get_raw_model().explain()
    except Exception as exc:  # noqa: BLE001 - the refusal is what is asserted on
        return f"{type(exc).__name__}: {exc}"


# -- artifact store -------------------------------------------------------------------------------


def test_store_attacker_onnx_with_rewritten_digests_is_refused_by_the_anchor(victim):
    vid = "onnxruntime-fp32-cpu"
    genuine = (victim.payload(vid) / "model.onnx").read_bytes()
    other = bytearray(genuine)
    other[len(other) // 2] ^= 0x40  # other weights
    with restored(victim.model_dir, victim.run_store):
        victim.rewrite_chain(vid, "model.onnx", bytes(other))
        with pytest.raises(TrustError, match="does not match the anchor"):
            mlflow.pyfunc.load_model(victim.uri)


def test_store_attacker_check_files_rewritten_are_refused(victim):
    with restored(victim.model_dir):
        outputs = victim.model_dir / "reference" / "check_outputs.npz"
        np.savez(outputs, output=np.zeros((2, 10), np.float32))
        with pytest.raises(IntegrityError, match="check_outputs.npz"):
            mlflow.pyfunc.load_model(victim.uri)
        _set_in_mlmodel(victim.model_dir / "MLmodel", lambda c: c["checks"].update(outputs=sha256_file(outputs)))
        with pytest.raises(TrustError, match="does not match the anchor"):
            mlflow.pyfunc.load_model(victim.uri)


def test_store_attacker_swapping_a_payload_only_loses_that_variant(victim):
    first = mlflow.pyfunc.load_model(victim.uri).get_raw_model().variant.id
    with restored(victim.run_store):
        (victim.payload(first) / "model.onnx").write_bytes(b"not the model")
        shutil.rmtree(os.environ["CHIMERA_CACHE_DIR"])  # the verified copy from the first load
        loaded = mlflow.pyfunc.load_model(victim.uri)
        assert loaded.get_raw_model().variant.id != first
        assert f"skipped {first}: failed to load: IntegrityError" in loaded.get_raw_model().explain()
        victim.predict_ok(loaded)


def test_store_attacker_benchmarks_do_not_steer_ranking_unless_anchored(victim, tmp_path):
    from mlflow_chimera import host

    host_class = host.fingerprint().host_class
    claim = {"host_class": host_class, "variants": {"eager-fp32-cpu": {"latency_ms": {"1": {"p50": 1e-6}}}}}
    path = tmp_path / "benchmarks" / f"{host_class}.json"
    path.parent.mkdir()
    path.write_text(json.dumps(claim))
    with restored(victim.model_dir), restored_tags(victim.model_id) as client:
        shutil.copytree(path.parent, victim.model_dir / "benchmarks")
        assert mlflow.pyfunc.load_model(victim.uri).get_raw_model().variant.id != "eager-fp32-cpu"
        # Stored by `chimera bench` (which anchors the file in the tracking store): it counts.
        client.set_logged_model_tags(victim.model_id, {BENCHMARK_ANCHOR_PREFIX + host_class: sha256_file(path)})
        assert mlflow.pyfunc.load_model(victim.uri).get_raw_model().variant.id == "eager-fp32-cpu"


def test_only_listed_files_are_fetched(victim):
    vid = "onnxruntime-fp32-cpu"
    with restored(victim.run_store):
        (victim.payload(vid) / "planted.so").write_bytes(b"\x7fELF")
        loaded = mlflow.pyfunc.load_model(victim.uri, model_config={"variant": vid})
        cache = Path(os.environ["CHIMERA_CACHE_DIR"])
        assert loaded.get_raw_model().variant.id == vid
        assert not list(cache.rglob("planted.so"))


# -- tracking database ----------------------------------------------------------------------------


def test_db_attacker_zeroed_or_removed_anchor_refuses_the_model(victim, monkeypatch):
    with restored_tags(victim.model_id) as client:
        client.set_logged_model_tags(victim.model_id, {ANCHOR_TAG: "0" * 64})
        with pytest.raises(TrustError, match="does not match the anchor"):
            mlflow.pyfunc.load_model(victim.uri)
        client.delete_logged_model_tag(victim.model_id, ANCHOR_TAG)
        with pytest.raises(TrustError, match="no chimera.anchor tag.*trust='digests'"):
            mlflow.pyfunc.load_model(victim.uri)
        monkeypatch.setenv("CHIMERA_TRUST", "digests")  # legacy models: on request only
        victim.predict_ok(mlflow.pyfunc.load_model(victim.uri))


def _publish_copy(victim, new_id: str, sign: bool, backend: str | None = None, p50: float = 1e-6) -> dict:
    """The attacker's (or a target host's) own run holding a copy of a genuine variant under a
    new id, with a flattering p50, announced by a tag. Returns the tag entry."""
    from mlflow_chimera.trust import sign_variant

    client = MlflowClient()
    run = client.create_run(mlflow.get_run(victim.info.run_id).info.experiment_id)
    source = victim.payload("onnxruntime-fp32-cpu")
    work = Path(os.environ["CHIMERA_CACHE_DIR"]).parent / f"publish-{new_id}"
    shutil.copytree(source, work)
    (work / "variant.sig").unlink(missing_ok=True)
    record = json.loads((work / "variant.json").read_text())
    record.update(id=new_id, location=f"runs:/{run.info.run_id}/chimera/variants/{new_id}")
    if backend:
        record["backend"] = backend
    for bench in record["benchmarks"]:
        for entry in bench["latency_ms"].values():
            entry["p50"] = p50
    (work / "variant.json").write_text(json.dumps(record))
    if sign:
        conf = victim.info.flavors["chimera"]
        sign_variant(work, new_id, {"reference": conf["reference"], "checks": conf["checks"],
                                    "signature": conf["signature"]}, Path(os.environ["CHIMERA_SIGNING_KEY"]))
    client.log_artifacts(run.info.run_id, str(work), artifact_path=f"chimera/variants/{new_id}")
    entry = {"uri": record["location"], "variant_json_sha256": sha256_file(work / "variant.json"),
             "status": "ready", "publisher": run.info.user_id}
    client.set_logged_model_tags(victim.model_id, {f"chimera.variant.{new_id}": json.dumps(entry)})
    return entry


def test_db_attacker_unsigned_published_variant_is_not_trusted(victim):
    with restored_tags(victim.model_id):
        _publish_copy(victim, "onnxruntime-fp32-cpu-evil", sign=False)
        raw = mlflow.pyfunc.load_model(victim.uri).get_raw_model()
        assert raw.variant.id != "onnxruntime-fp32-cpu-evil"
        assert "onnxruntime-fp32-cpu-evil: refused published variant: published by" in raw.explain()
        assert "without a signature from a trusted key" in raw.explain()


def test_signed_published_variant_counts_and_a_malformed_tag_loses_only_itself(victim):
    with restored_tags(victim.model_id) as client:
        _publish_copy(victim, "onnxruntime-fp32-cpu-fleet", sign=True)
        client.set_logged_model_tags(victim.model_id, {
            "chimera.variant.broken": json.dumps({"variant_json_sha256": "0" * 64}),  # no uri
            "chimera.variant.escape": json.dumps({"uri": "file:///etc", "variant_json_sha256": "0" * 64}),
            "chimera.variant.pathy": json.dumps({"uri": "runs:/abc/chimera/variants/pathy",
                                                 "variant_json_sha256": "../../../tmp/x"}),
        })
        raw = mlflow.pyfunc.load_model(victim.uri).get_raw_model()
        assert raw.variant.id == "onnxruntime-fp32-cpu-fleet"  # signed by a trusted key, fastest
        text = raw.explain()
        for vid in ("broken", "escape", "pathy"):
            assert f"{vid}: published tag is malformed" in text
        cache = Path(os.environ["CHIMERA_CACHE_DIR"])
        assert not Path("/tmp/x").exists() and not list(cache.parent.rglob("x"))
        victim.predict_ok(mlflow.pyfunc.load_model(victim.uri))


def test_published_record_naming_an_unregistered_backend_is_refused_not_imported(victim, monkeypatch):
    monkeypatch.setenv("CHIMERA_TRUST", "digests")  # even where published tags are taken at their word
    with restored_tags(victim.model_id):
        _publish_copy(victim, "onnxruntime-fp32-cpu-abort", sign=True, backend="os:abort")
        raw = mlflow.pyfunc.load_model(victim.uri).get_raw_model()  # this process is still alive
        assert "onnxruntime-fp32-cpu-abort: backend 'os:abort' is not registered" in raw.explain()


# -- author of a shared model directory ------------------------------------------------------------


def _archive_with(good: Path, evil: Path, rename: dict | None = None, replace: dict | None = None,
                  config_edit=None) -> None:
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            name = (rename or {}).get(item.filename, item.filename)
            payload = (replace or {}).get(name, payload)
            if config_edit and name.endswith("model_weights_config.json"):
                payload = config_edit(payload)
            dst.writestr(name, payload)


@pytest.mark.parametrize("where", ["json-named-weight", "sample_inputs", "plain-weight", "marker-named"])
def test_shared_directory_with_a_pickle_in_any_archive_entry_is_refused(shared_copy, where):
    path, _ = shared_copy
    program = path / "reference" / "program.pt2"
    names = zipfile.ZipFile(program).namelist()
    weight = next(n for n in names if "/data/weights/weight_" in n)
    evil = program.with_suffix(".evil")
    exploit = pickle.dumps(_Exploit())
    if where == "json-named-weight":  # the config points at a pickled entry whose name ends in .json
        folder, base = weight.rsplit("/", 1)

        def edit(config):
            data = json.loads(config)
            for entry in data["config"].values():
                if entry["path_name"] == base:
                    entry.update(path_name=base + ".json", use_pickle=True)
            return json.dumps(data).encode()

        _archive_with(program, evil, rename={weight: weight + ".json"}, replace={weight + ".json": exploit},
                      config_edit=edit)
    elif where == "sample_inputs":
        _archive_with(program, evil, replace={next(n for n in names if "sample_inputs" in n): exploit})
    elif where == "plain-weight":
        _archive_with(program, evil, replace={weight: exploit}, config_edit=lambda c: c.replace(
            b'"use_pickle": false', b'"use_pickle": true'))
    else:
        _archive_with(program, evil, replace={next(n for n in names if n.endswith("archive_version")): exploit})
    with pytest.raises(IntegrityError, match="refusing to unpickle"):
        validate_archive(evil)
    shutil.move(evil, program)
    _set_in_mlmodel(path / "MLmodel", lambda c: c["reference"].update(sha256=sha256_file(program)))
    text = _explain_or_error(lambda: mlflow.pyfunc.load_model(str(path), model_config={"variant": "eager-fp32-cpu"}))
    assert "refusing to unpickle" in text


def test_shared_directory_int8_relabelled_fp32_is_refused(shared_copy):
    path, _ = shared_copy
    fp32, int8 = path / "variants" / "onnxruntime-fp32-cpu", path / "variants" / "onnxruntime-int8-cpu"
    shutil.copy(int8 / "model.onnx", fp32 / "model.onnx")
    _fix_record(fp32 / "variant.json", path / "MLmodel", "onnxruntime-fp32-cpu",
                {"model.onnx": sha256_file(fp32 / "model.onnx")},
                {"parity": {**json.loads((fp32 / "variant.json").read_text())["parity"],
                            "tolerance": {"atol": 1.0, "rtol": 1.0}}})
    text = _explain_or_error(lambda: mlflow.pyfunc.load_model(str(path),
                                                              model_config={"variant": "onnxruntime-fp32-cpu"}))
    assert "claims fp32, but its graph has quantisation operators" in text


def test_shared_directory_unlisted_file_is_never_opened(shared_copy):
    path, _ = shared_copy
    vdir = path / "variants" / "onnxruntime-fp32-cpu"
    _fix_record(vdir / "variant.json", path / "MLmodel", "onnxruntime-fp32-cpu", {}, {"files": {}})
    text = _explain_or_error(lambda: mlflow.pyfunc.load_model(str(path),
                                                              model_config={"variant": "onnxruntime-fp32-cpu"}))
    assert "does not list model.onnx" in text


@pytest.mark.parametrize("attack", ["dotdot-file", "absolute-file", "symlink", "variant-id", "location",
                                    "reference-uri"])
def test_shared_directory_paths_stay_confined(shared_copy, tmp_path, attack):
    path, model = shared_copy
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    vid = "onnxruntime-fp32-cpu"
    vdir = path / "variants" / vid
    mlmodel = path / "MLmodel"
    if attack == "dotdot-file":
        rel = os.path.relpath(secret, vdir)
        _fix_record(vdir / "variant.json", mlmodel, vid, {rel: sha256_file(secret)}, {})
    elif attack == "absolute-file":
        _fix_record(vdir / "variant.json", mlmodel, vid, {str(secret): sha256_file(secret)}, {})
    elif attack == "symlink":
        (vdir / "model.onnx").unlink()
        shutil.copy(secret, tmp_path / "model.onnx")
        (vdir / "model.onnx").symlink_to(tmp_path / "model.onnx")
        _fix_record(vdir / "variant.json", mlmodel, vid, {"model.onnx": sha256_file(secret)}, {})
    elif attack == "variant-id":
        def rename(conf):
            conf["variants"]["../../evil"] = conf["variants"].pop(vid)
        _set_in_mlmodel(mlmodel, rename)
    elif attack == "location":
        _fix_record(vdir / "variant.json", mlmodel, vid, {}, {"location": f"file://{tmp_path}"})
    else:
        _set_in_mlmodel(mlmodel, lambda c: c["reference"].update(uri=f"file://{secret}"))
    text = _explain_or_error(lambda: mlflow.pyfunc.load_model(str(path)))
    expected = {"dotdot-file": "invalid file path", "absolute-file": "invalid file path",
                "symlink": "resolves outside", "variant-id": "invalid variant id",
                "location": "is not allowed", "reference-uri": "reference program location"}[attack]
    assert expected in text
    if attack != "reference-uri":  # the rest of the model still serves, correctly
        loaded = mlflow.pyfunc.load_model(str(path))
        assert loaded.get_raw_model().variant.id != vid
        x = models.examples(batch=3, seed=5)["cnn"]
        np.testing.assert_allclose(loaded.predict(x), models.eager_outputs(model, x)[0], atol=1e-4)
    assert not list(Path(os.environ["CHIMERA_CACHE_DIR"]).rglob("secret"))


# -- native code (slow: AOTInductor and torch.compile builds) --------------------------------------


@pytest.fixture(scope="module")
def native_victim(tracking_uri):
    model = models.cnn()
    info = mlflow.chimera.log_model(model, name="native-victim", input_example=models.examples()["cnn"],
                                    registered_model_name="native-victim",
                                    backends=["aotinductor", "torch_compile", "onnxruntime"], precisions=["fp32"])
    return Victim(info, model, models.examples()["cnn"], "native-victim")


def _native_ids(victim):
    variants = victim.info.flavors["chimera"]["variants"]
    return ([v for v in variants if v.startswith("aotinductor") and variants[v]["status"] == "ready"],
            [v for v in variants if v.startswith("torch_compile") and variants[v]["status"] == "ready"])


@pytest.mark.slow
def test_store_attacker_native_code_with_rewritten_digests_is_never_fetched(native_victim):
    aoti, compiled = _native_ids(native_victim)
    assert aoti and compiled
    with restored(native_victim.model_dir, native_victim.run_store):
        native_victim.rewrite_chain(aoti[0], "model.pt2", b"\x7fELF not a package")
        native_victim.rewrite_chain(compiled[0], "compile_cache.bin", pickle.dumps(_Exploit()))
        with pytest.raises(TrustError, match="does not match the anchor"):
            mlflow.pyfunc.load_model(native_victim.uri, model_config={"variant": compiled[0]})
    # Nothing fetched (an anchor remembered by an earlier load of the intact model aside).
    assert not [p for p in Path(os.environ["CHIMERA_CACHE_DIR"]).rglob("*") if p.is_file() and p.parent.name != "anchors"]


@pytest.mark.slow
def test_torch_compile_cache_stays_out_of_the_host_wide_inductor_cache(native_victim, tmp_path, monkeypatch):
    _, compiled = _native_ids(native_victim)
    host_wide = tmp_path / "inductor-host"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(host_wide))
    loaded = mlflow.pyfunc.load_model(native_victim.uri, model_config={"variant": compiled[0]})
    native_victim.predict_ok(loaded)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(host_wide)
    private = Path(os.environ["CHIMERA_CACHE_DIR"]) / "inductor"
    assert private.is_dir() and any(p.is_file() for p in private.rglob("*"))
    assert not host_wide.exists() or not any(p.is_file() for p in host_wide.rglob("*"))


@pytest.mark.slow
def test_trust_signed_loads_native_code_only_with_a_trusted_signature(native_victim, tmp_path, monkeypatch):
    aoti, compiled = _native_ids(native_victim)
    local = Path(mlflow.artifacts.download_artifacts(native_victim.uri, dst_path=str(tmp_path / "copy")))
    monkeypatch.setenv("CHIMERA_TRUST", "signed")
    raw = mlflow.pyfunc.load_model(str(local), model_config={"variant": aoti[0]}).get_raw_model()
    assert raw.variant.id == aoti[0]  # logged with the session's key, which this side trusts
    # A shared directory whose native code carries no signature: refused, never loaded.
    genuine_sig = (local / "variants" / aoti[0] / "variant.sig").read_bytes()
    (local / "variants" / aoti[0] / "variant.sig").unlink()
    (local / "variants" / compiled[0] / "variant.sig").write_bytes(b"{}")
    raw = mlflow.pyfunc.load_model(str(local)).get_raw_model()
    text = raw.explain()
    assert f"{aoti[0]}: refused: variant {aoti[0]} carries no signature" in text
    assert f"{compiled[0]}: refused: variant {compiled[0]}" in text
    assert raw.variant.backend == "onnxruntime"
    # Another key than the one that signed: refused too.
    from mlflow_chimera.signing import generate_key_pair

    (local / "variants" / aoti[0] / "variant.sig").write_bytes(genuine_sig)
    generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    monkeypatch.setenv("CHIMERA_TRUSTED_KEYS", str(tmp_path / "other.pub"))
    with pytest.raises(Exception, match="did not verify"):
        mlflow.pyfunc.load_model(str(local), model_config={"variant": aoti[0]})
