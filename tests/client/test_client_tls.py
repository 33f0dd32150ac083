"""TLS: a throwaway CA, server and client certificates made in the test (openssl), a real server
listening with them (--tls-cert, --tls-key, --tls-client-ca), and the client's root-certificate,
client-certificate and server-name options."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from seqserve.client import AsyncClient, Client, RetryPolicy, Unavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
NO_RETRY = RetryPolicy(max_attempts=1)  # a handshake failure is UNAVAILABLE; retrying it only waits


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(folder: Path) -> dict[str, Path]:
    """ca.pem (self-signed root), server.pem for localhost and 127.0.0.1, client.pem; EC keys (fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=seqserve test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    # A second CA that signed nothing here: trusting it must not be enough.
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other CA",
             cwd=folder)
    return {name: folder / f"{name}" for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                                                   "other.pem")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: dict[str, Path], *, require_client_auth: bool) -> dict[str, str]:
    """Server settings (--tls-cert, --tls-key, --tls-client-ca) for the test PKI."""
    settings = {"tls_cert": str(pki["server.pem"]), "tls_key": str(pki["server.key"])}
    if require_client_auth:
        settings["tls_client_ca"] = str(pki["ca.pem"])
    return settings


def test_tls_with_the_servers_ca(start_server, pki) -> None:
    server = start_server(**tls_settings(pki, require_client_auth=False))
    port = server.port
    with Client(f"localhost:{port}", root_certificates=pki["ca.pem"]) as client:
        assert client.generate("nov 5 1999").text
        assert client.health().value == "SERVING"
    # An IP address is in the certificate too; PEM given as bytes; two addresses (ipv4 list) over TLS.
    with Client([f"127.0.0.1:{port}", f"127.0.0.1:{port}"], root_certificates=pki["ca.pem"].read_bytes()) as client:
        assert len(client.generate(["nov 5 1999", "1 may 2000"])) == 2
    with Client(f"127.0.0.1:{port}", timeout=5, retry=NO_RETRY) as plaintext, pytest.raises(Unavailable):
        plaintext.generate("x")
    with Client(f"127.0.0.1:{port}", root_certificates=pki["other.pem"], timeout=5, retry=NO_RETRY) as wrong_ca, \
            pytest.raises(Unavailable):
        wrong_ca.generate("x")
    # The certificate names localhost and 127.0.0.1, not this name.
    with Client(f"127.0.0.1:{port}", root_certificates=pki["ca.pem"], tls_server_name="elsewhere.test", timeout=5,
                retry=NO_RETRY) as wrong_name, pytest.raises(Unavailable):
        wrong_name.generate("x")


def test_mutual_tls_needs_the_client_certificate(start_server, pki) -> None:
    server = start_server(**tls_settings(pki, require_client_auth=True))
    address = f"localhost:{server.port}"
    with Client(address, root_certificates=pki["ca.pem"], timeout=5, retry=NO_RETRY) as anonymous, \
            pytest.raises(Unavailable):
        anonymous.generate("x")
    with Client(address, root_certificates=pki["ca.pem"], client_certificate=pki["client.pem"],
                client_key=pki["client.key"]) as client:
        assert client.generate("nov 5 1999").text

    async def main() -> str:
        async with AsyncClient(address, root_certificates=pki["ca.pem"], client_certificate=pki["client.pem"],
                               client_key=pki["client.key"]) as client:
            return (await client.generate("nov 5 1999")).text

    assert asyncio.run(main())
