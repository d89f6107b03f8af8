"""Throwaway certificates for the TLS tests, made with the `openssl` command line: a CA and leaves signed by it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# OpenSSL 3 and Python 3.13's strict verification want a real CA (basicConstraints, keyUsage) and key ids.
_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1
"""


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    ca: Path  # the CA certificate that signed it


def _openssl(*args: str) -> None:
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 CA: (certificate, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> Leaf:
    """A P-256 certificate for `name` signed by `ca`."""
    key, csr, cert, ext = (folder / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
    ext.write_text(_LEAF_EXTENSIONS)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return Leaf(cert, key, ca[0])


def encrypt_key(key: Path, out: Path) -> Path:
    """`key`, encrypted with a passphrase."""
    _openssl("pkey", "-in", str(key), "-aes256", "-passout", "pass:a-passphrase", "-out", str(out))
    return out
