"""Build DICOM-Mail messages by hand, as other (or hostile) senders might."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.wire.conftest import Site


def dicom_part(data: bytes, filename: str, content_type: str = "application/dicom") -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: {content_type}; name="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'
    ).encode() + encoded


def inner_entity(parts: list[bytes], set_headers: dict[str, str] | None = None) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in (set_headers or {}).items())
    body = b"".join(b"--B\r\n" + p for p in parts) + b"--B--\r\n"
    return f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n{head}\r\n'.encode() + body


def encrypted_mail(sender: Site, recipient: str, inner: bytes, out: Path, extra_headers: str = "") -> Path:
    """Sign and encrypt ``inner`` with ``sender``'s key; wrap it as PGP/MIME in ``out``."""
    inner_path = out.with_suffix(".inner")
    armored = out.with_suffix(".asc")
    inner_path.write_bytes(inner)
    sender.keyring.sign_encrypt_file(
        inner_path, armored, recipient=recipient, signer=sender.fingerprint, passphrase=None
    )
    head = (
        f"From: {sender.address}\r\nTo: {recipient}\r\nSubject: test\r\nMessage-ID: <{out.stem}@forge.test>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        f'boundary="E"\r\n{extra_headers}\r\n'
    ).encode()
    body = (
        b"--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b"--E\r\nContent-Type: application/octet-stream\r\n\r\n"
        + armored.read_bytes().replace(b"\n", b"\r\n")
        + b"\r\n--E--\r\n"
    )
    out.write_bytes(head + body)
    inner_path.unlink()
    armored.unlink()
    return out
