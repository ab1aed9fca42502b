"""A throwaway PKI for TLS tests and benchmarks, made with the ``openssl`` command.

``make_pki(directory)`` writes: ``ca.pem``/``ca.key`` (a test CA), ``server.pem``/``server.key``
(for 127.0.0.1 and localhost, signed by the CA), ``client.pem``/``client.key`` (a client
certificate for mutual TLS) and ``other.key`` (a key that matches no certificate). EC P-256
keys, valid two days. Never use these outside tests.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(pki: Path, name: str, subject: str, extensions: str) -> None:
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)


def issue_server_certificate(pki: Path, name: str) -> tuple[Path, Path]:
    """A new server certificate and key for 127.0.0.1 and localhost, signed by ``pki``'s CA
    (``name``.pem, ``name``.key); returns their paths."""
    _leaf(pki, name, "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
          "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    return pki / f"{name}.pem", pki / f"{name}.key"


def make_pki(pki: Path) -> Path:
    """Write the CA, server, client and stray key files into ``pki`` (created); return it."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=policy test CA", cwd=pki)
    issue_server_certificate(pki, "server")
    _leaf(pki, "client", "/CN=robot-7", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
          "extendedKeyUsage=clientAuth\n")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key", cwd=pki)
    return pki
