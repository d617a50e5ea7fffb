"""Throwaway CA and localhost server certificate, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Python 3.13+ verifies with VERIFY_X509_STRICT, which wants key usages and
# key identifiers present; we add them so clients of any version accept it.
_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

# EC keys are generated in milliseconds, RSA keys can take a second.
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    """Paths of the generated PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{result.stderr}")


def make_certificates(directory: Path, days: int = 7) -> Certificates:
    """Create a CA and a CA-signed cert for localhost/127.0.0.1 in *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_NEW_KEY, "-keyout", "ca.key", "-out", "ca.pem",
        "-days", str(days), "-subj", "/CN=dicommail testbed CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", *_NEW_KEY, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS)
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", str(days), "-extfile", "server.ext",
        "-out", "server.pem",
        cwd=directory,
    )  # fmt: skip
    # Servers read the key as root before dropping privileges; keep it private.
    for key in ("ca.key", "server.key"):
        (directory / key).chmod(0o600)
    return Certificates(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
