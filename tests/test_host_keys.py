"""Host key loading: each key text is checked once per process (the checks of an RSA key
cost ~160 ms of CPU and a start used to pay them ten times), and a key that fails them
is still refused, however often it is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scriptsftp.server.support import keys


def _write(path: Path, key: rsa.RSAPrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def _inconsistent_rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key whose private exponent does not match its modulus: what the skipped-once
    checks exist to catch (a corrupted or tampered file)."""
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    bad = rsa.RSAPrivateNumbers(good.p, good.q, good.d + 2, good.dmp1, good.dmq1, good.iqmp, good.public_numbers)
    return bad.private_key(unsafe_skip_rsa_key_validation=True)


def test_an_inconsistent_rsa_host_key_is_refused_at_every_load(tmp_path: Path):
    path = _write(tmp_path / "bad_rsa", _inconsistent_rsa_key())
    for _ in range(2):  # a refused text is never remembered as checked
        with pytest.raises(Exception):
            keys.load_host_key(path)
        with pytest.raises(ValueError):
            keys.host_key_from_text(path.read_text())


def test_a_host_key_loaded_again_is_the_same_key_and_signs(host_keys: Path):
    for name in ("ssh_host_rsa_key", "ssh_host_ed25519_key"):
        path = host_keys / name
        first, again = keys.load_host_key(path), keys.host_key_from_text(keys.read_host_key(path))
        reference = paramiko.PKey.from_path(str(path))  # paramiko's own loader, checks and all
        assert first.get_name() == again.get_name() == reference.get_name()
        assert keys.fingerprint(first) == keys.fingerprint(again) == keys.fingerprint(reference)
        signature = again.sign_ssh_data(b"session id", "rsa-sha2-256" if name.endswith("rsa_key") else None)
        signature.rewind()
        public = paramiko.PKey.from_type_string(reference.get_name(), reference.asbytes())
        assert public.verify_ssh_sig(b"session id", signature)


def test_a_group_readable_key_or_a_garbage_file_is_refused(tmp_path: Path, host_keys: Path):
    readable = tmp_path / "readable"
    readable.write_bytes((host_keys / "ssh_host_rsa_key").read_bytes())
    readable.chmod(0o640)
    with pytest.raises(ValueError, match="readable by others"):
        keys.load_host_key(readable)
    garbage = tmp_path / "garbage"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(Exception):  # paramiko's loader names the problem, as before
        keys.load_host_key(garbage)
