"""Key-based signatures over a small directory of manifest files (OpenSSF ``model-signing``).

A *manifest directory* holds one or a few small JSON files (written elsewhere) that pin
digests. :func:`sign_manifest` signs every regular file in it with an elliptic-curve private key
and writes the signature, a Sigstore bundle with a DSSE envelope, to ``chimera.sig`` in the
same directory; :func:`verify_manifest` checks that signature against trusted public keys.
Everything is offline: no Sigstore, no transparency log, no network.

What a signature covers: exactly the regular files under the directory (dot-files and
``.git*`` included, subdirectories included) except the top-level ``chimera.sig``. Verification
fails when a file changed, was removed or was *added*, when the directory holds a symlink, when
the signature is not JSON/not a bundle, or when it was made with a key that is not trusted. The
directory's own name is not covered (a copy elsewhere verifies).

``model_signing`` (and ``pyopenssl``, which it imports) is imported only by the functions that
need it; ``import mlflow_chimera`` stays cheap. Install with ``pip install model-signing
pyopenssl``.

Configuration: ``CHIMERA_TRUSTED_KEYS`` (``os.pathsep``-separated PEM public keys or
directories of ``*.pub``/``*.pem`` files) and ``CHIMERA_SIGNING_KEY`` (a PEM private key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path, PurePosixPath

SIGNATURE_FILE = "chimera.sig"
TRUSTED_KEYS_ENV = "CHIMERA_TRUSTED_KEYS"
SIGNING_KEY_ENV = "CHIMERA_SIGNING_KEY"
KEY_SUFFIXES = (".pub", ".pem")
INSTALL_HINT = "pip install model-signing pyopenssl"

# A signature over a few small JSON files is a few KiB; refuse to parse anything absurd.
_MAX_SIGNATURE_BYTES = 16 * 1024 * 1024


class SignatureError(Exception):
    """Signing or verification failed; the message is one line naming what was tried and why."""


# -- keys -----------------------------------------------------------------------------------------


def generate_key_pair(private_path, public_path, *, overwrite: bool = False) -> None:
    """Write a new EC P-256 key pair as PEM files.

    The private key (PKCS#8, unencrypted) is created with mode 0600; the public key is a
    SubjectPublicKeyInfo PEM. Existing files are not replaced unless ``overwrite`` is true
    (``FileExistsError`` otherwise), so a key cannot be lost by accident.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = Path(private_path), Path(public_path)
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and private_path.exists():
        private_path.unlink()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as handle:
            fd = None
            handle.write(private_pem)
    finally:
        if fd is not None:
            os.close(fd)
    public_path.write_bytes(public_pem)


def _load_public_key(path: Path):
    """The public key in a PEM file (a public key, or an unencrypted private key's public half)."""
    from cryptography.hazmat.primitives import serialization

    data = Path(path).read_bytes()
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        pass
    try:
        return serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not a PEM public key ({_one_line(exc)})") from None


def key_id(public_key) -> str:
    """A short, stable identifier of a key: ``sha256:`` + the first 16 hex digits of the SHA-256
    of the public key's DER SubjectPublicKeyInfo. ``public_key`` is a PEM file (a public key, or
    an unencrypted private key, whose public half is used)."""
    from cryptography.hazmat.primitives import serialization

    path = Path(public_key)
    try:
        key = _load_public_key(path)
    except OSError as exc:
        raise SignatureError(f"cannot read key {path}: {_one_line(exc)}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def _split_paths(value) -> list[str]:
    if isinstance(value, os.PathLike):
        return [os.fspath(value)]
    if isinstance(value, str):
        return [part.strip() for part in value.split(os.pathsep) if part.strip()]
    return [os.fspath(item).strip() for item in value if os.fspath(item).strip()]


def trusted_public_keys(config_value=None) -> list[Path]:
    """The trusted public keys: from ``config_value`` (a list of paths, or a string of paths
    separated by ``os.pathsep``) when given, else from ``CHIMERA_TRUSTED_KEYS``.

    Each path is a PEM public key file or a directory whose ``*.pub``/``*.pem`` files (not
    recursive) are keys. Returns an empty list when nothing is configured. Raises
    :class:`SignatureError` naming every configured path that does not exist.
    """
    if config_value is None:
        config_value = os.environ.get(TRUSTED_KEYS_ENV, "")
    entries = [Path(os.path.expanduser(p)) for p in _split_paths(config_value)]
    missing = [str(p) for p in entries if not p.exists()]
    if missing:
        raise SignatureError(f"trusted key path(s) not found: {', '.join(missing)}")
    keys: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix in KEY_SUFFIXES and p.is_file())
        else:
            found = [entry]
        for path in found:
            if path not in keys:
                keys.append(path)
    return keys


def signing_key(config_value=None) -> Path | None:
    """The private key to sign with: ``config_value`` when given, else ``CHIMERA_SIGNING_KEY``;
    ``None`` when neither is set."""
    value = config_value if config_value is not None else os.environ.get(SIGNING_KEY_ENV, "")
    value = os.fspath(value).strip()
    return Path(os.path.expanduser(value)) if value else None


# -- sign / verify --------------------------------------------------------------------------------


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise SignatureError(f"model-signing is not installed ({_one_line(exc)}): {INSTALL_HINT}") from None
    return model_signing


def _hashing_config(ms):
    """Hash every file with SHA-256 except the signature itself; do not skip ``.git*`` files
    (model_signing's default does)."""
    return ms.hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(
        paths=[SIGNATURE_FILE], ignore_git_paths=False)


def _directory_files(manifest_dir: Path) -> list[str]:
    """The files a signature over ``manifest_dir`` must cover, as POSIX relative paths."""
    names = []
    for root, dirs, files in os.walk(manifest_dir):
        for name in dirs + files:
            path = Path(root, name)
            if path.is_symlink():
                raise SignatureError(f"{path} is a symlink; a signed manifest directory holds only files")
        for name in files:
            path = Path(root, name)
            rel = PurePosixPath(*path.relative_to(manifest_dir).parts)
            if str(rel) == SIGNATURE_FILE:
                continue
            if not path.is_file():
                raise SignatureError(f"{path} is not a regular file")
            names.append(str(rel))
    return sorted(names)


def sign_manifest(manifest_dir, private_key) -> Path:
    """Sign every file in the directory ``manifest_dir`` (except an existing signature) with the
    EC private key in PEM file ``private_key`` (unencrypted) and write the signature to
    ``manifest_dir / SIGNATURE_FILE`` (replaced atomically). Returns the signature's path.

    Raises :class:`SignatureError` when the directory is missing or empty or holds a symlink,
    the key is unusable, or model-signing is not installed.
    """
    manifest_dir, private_key = Path(manifest_dir), Path(private_key)
    if not manifest_dir.is_dir():
        raise SignatureError(f"cannot sign {manifest_dir}: not a directory")
    if not _directory_files(manifest_dir):
        raise SignatureError(f"cannot sign {manifest_dir}: it holds no files")
    if not private_key.is_file():
        raise SignatureError(f"signing key {private_key} not found")
    ms = _model_signing()
    target = manifest_dir / SIGNATURE_FILE
    # Written beside the target (created after hashing, so not covered), then renamed over it.
    partial = manifest_dir / f".{SIGNATURE_FILE}.{os.getpid()}.partial"
    try:
        try:
            config = ms.signing.Config().use_elliptic_key_signer(private_key=private_key)
        except Exception as exc:  # noqa: BLE001 - any key problem is reported the same way
            raise SignatureError(f"cannot sign with {private_key}: {_one_line(exc)} "
                                 "(expected an unencrypted EC P-256/P-384/P-521 PEM private key)") from None
        try:
            config.set_hashing_config(_hashing_config(ms)).sign(manifest_dir, partial)
        except Exception as exc:  # noqa: BLE001
            raise SignatureError(f"signing {manifest_dir} failed: {_one_line(exc)}") from None
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def verify_manifest(manifest_dir, public_keys) -> str:
    """Verify ``manifest_dir / SIGNATURE_FILE`` against each key of ``public_keys`` (PEM files)
    in turn and return the :func:`key_id` of the first one it verifies with.

    Verification covers exactly the files of the directory minus the signature: a changed,
    missing or added file fails it. Raises :class:`SignatureError` (one line, naming the keys
    tried and why each refused) when no key is configured, the signature is missing or
    unreadable, no trusted key verifies it, or model-signing is not installed.
    """
    manifest_dir = Path(manifest_dir)
    public_keys = [Path(k) for k in (public_keys or [])]
    signature_path = manifest_dir / SIGNATURE_FILE
    if not public_keys:
        raise SignatureError(f"cannot verify {signature_path}: no trusted public keys configured "
                             f"(set {TRUSTED_KEYS_ENV} or pass trusted keys)")
    if not signature_path.is_file() or signature_path.is_symlink():
        raise SignatureError(f"no signature: {signature_path} is missing")
    if signature_path.stat().st_size > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{signature_path} is not a signature (over {_MAX_SIGNATURE_BYTES} bytes)")
    signature = signature_path.read_bytes()  # read once; every check below uses these bytes
    statement, hint = _parse_signature(signature, signature_path)
    files = _directory_files(manifest_dir)
    ms = _model_signing()
    import tempfile

    reasons = []
    with tempfile.TemporaryDirectory(prefix="chimera-sig-") as tmp:
        copy = Path(tmp, SIGNATURE_FILE)
        copy.write_bytes(signature)
        for key_path in public_keys:
            try:
                ident = key_id(key_path)
            except SignatureError as exc:
                reasons.append(f"{key_path}: {exc}")
                continue
            label = f"{ident} ({key_path})"
            if hint != _model_signing_hint(key_path):
                reasons.append(f"{label}: signed by another key")
                continue
            try:
                ms.verifying.Config().use_elliptic_key_verifier(public_key=key_path).set_hashing_config(
                    _hashing_config(ms)).verify(manifest_dir, copy)
            except Exception as exc:  # noqa: BLE001 - model_signing raises ValueError, KeyError, ...
                problems = _content_problems(manifest_dir, statement, files)
                if str(exc).startswith("Signature mismatch") and problems:
                    reasons.append(f"{label}: files do not match the signature ({'; '.join(problems)})")
                elif type(exc).__name__ == "InvalidSignature":
                    reasons.append(f"{label}: invalid signature (corrupt or forged)")
                else:
                    reasons.append(f"{label}: {type(exc).__name__}: {_one_line(exc)}")
                continue
            # model_signing agreed; check independently that the signed set is exactly the files.
            problems = _content_problems(manifest_dir, statement, files)
            if problems:
                reasons.append(f"{label}: files do not match the signature ({'; '.join(problems)})")
                continue
            return ident
    raise SignatureError(f"{signature_path} did not verify with any trusted key; tried "
                         + "; ".join(reasons))


def _model_signing_hint(key_path: Path) -> str:
    """The key hint model_signing writes in a bundle: SHA-256 hex of the SPKI PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = _load_public_key(key_path).public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _parse_signature(data: bytes, path: Path) -> tuple[dict, str]:
    """The in-toto statement and public-key hint of a signature file (not yet verified)."""
    try:
        bundle = json.loads(data.decode("utf-8"))
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        if not isinstance(hint, str) or not hint or not isinstance(statement, dict):
            raise ValueError("no public-key hint")
        statement["predicate"]["resources"]  # noqa: B018 - shape check
    except Exception as exc:  # noqa: BLE001 - garbage in any form is "not a signature"
        raise SignatureError(f"{path} is not a model-signing key signature "
                             f"({type(exc).__name__}: {_one_line(exc)})") from None
    return statement, hint


def _content_problems(manifest_dir: Path, statement: dict, files: list[str]) -> list[str]:
    """What differs between the files a statement lists and the directory's files (empty when
    they match exactly, digest for digest)."""
    try:
        predicate = statement["predicate"]
        ignored = [str(p) for p in predicate.get("serialization", {}).get("ignore_paths", [])]
        signed = {r["name"]: (r["algorithm"], r["digest"]) for r in predicate["resources"]}
    except (KeyError, TypeError, AttributeError) as exc:
        return [f"malformed statement ({_one_line(exc)})"]
    problems = []
    if any(p != SIGNATURE_FILE for p in ignored):
        problems.append(f"signature ignores paths {sorted(ignored)}")
    extra = sorted(set(files) - set(signed))
    missing = sorted(set(signed) - set(files))
    changed = []
    for name in sorted(set(files) & set(signed)):
        algorithm, digest = signed[name]
        if algorithm != "sha256":
            problems.append(f"unsupported digest {algorithm!r} for {name}")
        elif hashlib.sha256(Path(manifest_dir, name).read_bytes()).hexdigest() != digest:
            changed.append(name)
    if changed:
        problems.append("changed: " + ", ".join(changed))
    if extra:
        problems.append("not signed: " + ", ".join(extra))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    return problems


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
