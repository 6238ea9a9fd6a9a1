"""SSH keys: users' OpenSSH public keys and the server's own host keys."""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

log = logging.getLogger("scriptsftp.keys")

ACCEPTED_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",  # the key format; signatures are rsa-sha2-256/512 only (paramiko 5 dropped SHA-1)
)


def parse_public_key(line: str) -> paramiko.PKey:
    """One ``authorized_keys``-style line → a paramiko key. Raises ValueError with a reason."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("expected 'TYPE BASE64 [comment]'")
    key_type, blob = fields[0], fields[1]
    if key_type not in ACCEPTED_KEY_TYPES:
        raise ValueError(f"key type {key_type!r} is not accepted (use ed25519, ecdsa or rsa)")
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key data is not valid base64") from None
    try:
        key = paramiko.PKey.from_type_string(key_type, data)
    except Exception as exc:  # paramiko raises several unrelated types for bad blobs
        raise ValueError(f"not a valid {key_type} key ({exc.__class__.__name__})") from None
    if key.get_name() != key_type:
        raise ValueError(f"the key data is a {key.get_name()} key, not {key_type}")
    if isinstance(key, paramiko.RSAKey) and key.get_bits() < 2048:
        raise ValueError("RSA keys shorter than 2048 bits are refused")
    return key


def _write_private(path: Path, pem: bytes) -> None:
    """Create the file 0600 from the start (CVE-2022-24302 was a chmod race)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def ensure_host_keys(directory: Path) -> list[Path]:
    """Generate Ed25519 and RSA-3072 host keys on first start; return their paths."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ed_path, rsa_path = directory / "ssh_host_ed25519_key", directory / "ssh_host_rsa_key"
    if not ed_path.exists():
        ed_key = ed25519.Ed25519PrivateKey.generate()
        _write_private(
            ed_path,
            ed_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        log.info("generated host key %s", ed_path)
    if not rsa_path.exists():
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        _write_private(
            rsa_path,
            rsa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        log.info("generated host key %s", rsa_path)
    return [ed_path, rsa_path]


def load_host_key(path: Path) -> paramiko.PKey:
    """Load a private host key of any supported type; refuse group/world-readable files."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"{path}: host key is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        return host_key_from_text(path.read_text())
    except Exception:  # noqa: BLE001 - paramiko's loader says what is wrong with the file, as it always did
        return paramiko.PKey.from_path(str(path))


def read_host_key(path: Path) -> str:
    """A host key file's text, checked as :func:`load_host_key` checks it: the core reads it
    and hands the text to SSH worker processes, which run as an account that cannot."""
    load_host_key(path)
    return path.read_text()


#: SHA-256 of the key texts whose RSA key passed cryptography's consistency checks in this
#: process. The checks cost ~160 ms of CPU per RSA-3072 load, and a start loads each host key
#: several times (the checks here, the listener, every SSH worker): paid once per text instead.
#: Forked SSH workers inherit the set, so they do not check again what the core checked.
_checked_texts: set[bytes] = set()


def host_key_from_text(text: str) -> paramiko.PKey:
    """A private host key from its file's text (what :func:`read_host_key` gave)."""
    import hashlib
    import io

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    data = text.encode()
    digest = hashlib.sha256(data).digest()
    checked = digest in _checked_texts
    loaded: PrivateKeyTypes
    try:
        loaded = serialization.load_ssh_private_key(data, password=None, unsafe_skip_rsa_key_validation=checked)
    except ValueError:
        loaded = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=checked)
    _checked_texts.add(digest)
    if isinstance(loaded, rsa.RSAPrivateKey):
        return paramiko.RSAKey(key=loaded)  # the key just loaded: paramiko parsing the text again checks again
    cls: type[paramiko.PKey]
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        cls = paramiko.Ed25519Key
    elif isinstance(loaded, ec.EllipticCurvePrivateKey):
        cls = paramiko.ECDSAKey
    else:
        raise ValueError(f"unsupported host key type {type(loaded).__name__}")
    return cls.from_private_key(io.StringIO(text))


def fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint  # "SHA256:..." like ssh-keygen -l
