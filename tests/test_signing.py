"""mlflow_chimera.signing: key-based signatures over a manifest directory (model-signing, offline)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

pytest.importorskip("model_signing")

from mlflow_chimera import signing  # noqa: E402
from mlflow_chimera.signing import SIGNATURE_FILE, SignatureError  # noqa: E402


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    signing.generate_key_pair(folder / "a.key", folder / "a.pub")
    signing.generate_key_pair(folder / "b.key", folder / "b.pub")
    return folder


@pytest.fixture
def manifest_dir(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.pt": "ab" * 32}}))
    (folder / "variant.json").write_text(json.dumps({"id": "onnx-cpu", "digest": "cd" * 32}))
    return folder


def test_round_trip(keys, manifest_dir):
    sig = signing.sign_manifest(manifest_dir, keys / "a.key")
    assert sig == manifest_dir / SIGNATURE_FILE and sig.is_file()
    assert signing.verify_manifest(manifest_dir, [keys / "a.pub"]) == signing.key_id(keys / "a.pub")
    # the first trusted key that verifies wins; order of the others does not matter
    assert signing.verify_manifest(manifest_dir, [keys / "b.pub", keys / "a.pub"]) == \
        signing.key_id(keys / "a.pub")
    # re-signing replaces the signature (the old one is not part of what is signed)
    signing.sign_manifest(manifest_dir, keys / "b.key")
    assert signing.verify_manifest(manifest_dir, [keys / "b.pub"]) == signing.key_id(keys / "b.pub")
    assert sorted(p.name for p in manifest_dir.iterdir()) == [SIGNATURE_FILE, "manifest.json", "variant.json"]


def test_copy_elsewhere_verifies(keys, manifest_dir, tmp_path):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    other = tmp_path / "downloaded" / "elsewhere"
    other.mkdir(parents=True)
    for p in manifest_dir.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    assert signing.verify_manifest(other, [keys / "a.pub"]).startswith("sha256:")


def test_generated_key_files(keys):
    mode = stat.S_IMODE(os.stat(keys / "a.key").st_mode)
    assert mode == 0o600
    assert (keys / "a.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (keys / "a.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(FileExistsError):
        signing.generate_key_pair(keys / "a.key", keys / "c.pub")
    before = signing.key_id(keys / "a.pub")
    signing.generate_key_pair(keys / "a.key", keys / "a.pub", overwrite=True)
    assert signing.key_id(keys / "a.pub") != before
    assert stat.S_IMODE(os.stat(keys / "a.key").st_mode) == 0o600


def test_tampered_file_refused(keys, manifest_dir):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    (manifest_dir / "variant.json").write_text(json.dumps({"id": "onnx-cpu", "digest": "00" * 32}))
    with pytest.raises(SignatureError) as err:
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])
    message = str(err.value)
    assert "changed: variant.json" in message and signing.key_id(keys / "a.pub") in message
    assert "\n" not in message


def test_removed_file_refused(keys, manifest_dir):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    (manifest_dir / "variant.json").unlink()
    with pytest.raises(SignatureError, match="missing: variant.json"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


@pytest.mark.parametrize("extra", ["extra.json", ".hidden", ".gitignore", ".git/config", "sub/x.json"])
def test_extra_file_refused(keys, manifest_dir, extra):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    path = manifest_dir / extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    with pytest.raises(SignatureError, match=f"not signed: {extra}"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


def test_symlink_refused(keys, manifest_dir):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    (manifest_dir / "link.json").symlink_to(manifest_dir / "manifest.json")
    with pytest.raises(SignatureError, match="symlink"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


def test_other_key_refused(keys, manifest_dir):
    signing.sign_manifest(manifest_dir, keys / "b.key")
    with pytest.raises(SignatureError) as err:
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])
    message = str(err.value)
    assert "did not verify with any trusted key" in message
    assert signing.key_id(keys / "a.pub") in message and "signed by another key" in message


def test_forged_key_hint_refused(keys, manifest_dir):
    """A signature made with key b but claiming key a's hint fails the cryptographic check."""
    signing.sign_manifest(manifest_dir, keys / "a.key")
    hint_a = json.loads((manifest_dir / SIGNATURE_FILE).read_text())["verificationMaterial"]
    signing.sign_manifest(manifest_dir, keys / "b.key")
    bundle = json.loads((manifest_dir / SIGNATURE_FILE).read_text())
    bundle["verificationMaterial"] = hint_a
    (manifest_dir / SIGNATURE_FILE).write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="invalid signature"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


@pytest.mark.parametrize("garbage", [b"garbage", b"{}", b"\xff\xfe\x00", b"", b'{"verificationMaterial": 1}'])
def test_garbage_signature_refused(keys, manifest_dir, garbage):
    (manifest_dir / SIGNATURE_FILE).write_bytes(garbage)
    with pytest.raises(SignatureError, match="is not a model-signing key signature"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


def test_missing_signature(keys, manifest_dir):
    with pytest.raises(SignatureError, match="no signature"):
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])


def test_no_keys_configured(manifest_dir, monkeypatch):
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    assert signing.trusted_public_keys() == []
    with pytest.raises(SignatureError, match="no trusted public keys configured"):
        signing.verify_manifest(manifest_dir, signing.trusted_public_keys())


def test_bad_trusted_key_is_reported_and_others_tried(keys, manifest_dir, tmp_path):
    signing.sign_manifest(manifest_dir, keys / "a.key")
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a key")
    assert signing.verify_manifest(manifest_dir, [bogus, keys / "a.pub"]) == signing.key_id(keys / "a.pub")
    with pytest.raises(SignatureError, match="bogus.pem is not a PEM public key"):
        signing.verify_manifest(manifest_dir, [bogus])


def test_sign_refuses_bad_input(keys, tmp_path):
    with pytest.raises(SignatureError, match="not a directory"):
        signing.sign_manifest(tmp_path / "nope", keys / "a.key")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureError, match="holds no files"):
        signing.sign_manifest(tmp_path / "empty", keys / "a.key")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.json").write_text("{}")
    with pytest.raises(SignatureError, match="cannot sign with"):
        signing.sign_manifest(tmp_path / "m", keys / "a.pub")  # a public key is not a signing key
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["x.json"]


def test_trusted_keys_from_env(keys, tmp_path, monkeypatch):
    extra = tmp_path / "extra-keys"
    extra.mkdir()
    signing.generate_key_pair(extra / "c.key", extra / "c.pem")
    (extra / "README.txt").write_text("ignored")
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, os.pathsep.join([str(keys / "a.pub"), str(extra), ""]))
    # a.pub once (named and inside no dir), c.pem from the directory; *.key and *.txt skipped
    assert signing.trusted_public_keys() == [keys / "a.pub", extra / "c.pem"]
    # the key directory itself: *.pub only (b.pub and a.pub), sorted
    assert signing.trusted_public_keys(str(keys)) == [keys / "a.pub", keys / "b.pub"]
    # an explicit value wins over the environment; lists and single paths work
    assert signing.trusted_public_keys([keys / "b.pub"]) == [keys / "b.pub"]
    assert signing.trusted_public_keys(keys / "b.pub") == [keys / "b.pub"]
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, os.pathsep.join([str(keys / "a.pub"), str(tmp_path / "gone.pub")]))
    with pytest.raises(SignatureError, match="gone.pub"):
        signing.trusted_public_keys()


def test_signing_key_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(signing.SIGNING_KEY_ENV, raising=False)
    assert signing.signing_key() is None
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(tmp_path / "k.key"))
    assert signing.signing_key() == tmp_path / "k.key"
    assert signing.signing_key(tmp_path / "other.key") == tmp_path / "other.key"


def test_key_id_stable(keys, tmp_path):
    ident = signing.key_id(keys / "a.pub")
    assert ident.startswith("sha256:") and len(ident) == len("sha256:") + 16
    assert signing.key_id(keys / "a.pub") == ident
    copy = tmp_path / "copy.pem"
    copy.write_bytes((keys / "a.pub").read_bytes())
    assert signing.key_id(copy) == ident
    assert signing.key_id(keys / "a.key") == ident  # the private key's public half
    assert signing.key_id(keys / "b.pub") != ident
    # DER SubjectPublicKeyInfo, independent of PEM formatting
    from cryptography.hazmat.primitives import serialization
    import hashlib

    der = serialization.load_pem_public_key((keys / "a.pub").read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ident == "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def test_sign_verify_is_fast(keys, manifest_dir):
    signing.sign_manifest(manifest_dir, keys / "a.key")  # warm the imports
    start = time.perf_counter()
    for _ in range(10):
        signing.sign_manifest(manifest_dir, keys / "a.key")
        signing.verify_manifest(manifest_dir, [keys / "a.pub"])
    assert (time.perf_counter() - start) / 10 < 1.0


def test_import_is_cheap():
    code = ("import sys, mlflow_chimera.signing; "
            "print(any(m.split('.')[0] in ('model_signing', 'sigstore', 'OpenSSL', 'cryptography') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
