"""`sigmad pki`: the CA and the certificates of etcd, masters, agents and engines; what each
one is good for is checked with real TLS handshakes (the ssl contexts of sigmad.tls)."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sigmad.cli import cli
from sigmad.pki import MASTER_USER, PkiError, common_name, init_ca, issue, node_user
from sigmad.tls import TlsFiles, client_context, server_context


def files(d: Path, stem: str) -> TlsFiles:
    return TlsFiles(str(d / "ca.crt"), str(d / f"{stem}.crt"), str(d / f"{stem}.key"))


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "pki"
    init_ca(d)
    issue(d, "etcd", "e1", ("127.0.0.1", "localhost"))
    issue(d, "master", "m1", ("127.0.0.1",))
    issue(d, "node", "h1", ("127.0.0.1",))
    issue(d, "root")
    return d


def test_every_file_is_private_and_the_directory_too(pki: Path) -> None:
    written = sorted(p.name for p in pki.iterdir())
    assert written == sorted([
        "ca.crt", "ca.key", "etcd-e1-server.crt", "etcd-e1-server.key", "etcd-e1-peer.crt",
        "etcd-e1-peer.key", "master-m1-api.crt", "master-m1-api.key", "master-m1-etcd.crt",
        "master-m1-etcd.key", "master-m1-engine.crt", "master-m1-engine.key", "node-h1.crt",
        "node-h1.key", "engine-h1.crt", "engine-h1.key", "root.crt", "root.key"])
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    for path in pki.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_ca_is_not_replaced_without_force(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="--force"):
        init_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != before


def test_common_names_are_the_etcd_users(pki: Path) -> None:
    assert common_name(pki / "master-m1-etcd.crt") == MASTER_USER == "sigma-master"
    assert common_name(pki / "node-h1.crt") == node_user("h1") == "sigma-node-h1"
    assert common_name(pki / "root.crt") == "root"


def test_each_certificate_is_signed_by_the_ca_and_used_for_one_side(pki: Path) -> None:
    ca = load(pki / "ca.crt")
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    expected = {
        "etcd-e1-server": {server, client}, "etcd-e1-peer": {server, client},
        "master-m1-api": {server}, "master-m1-etcd": {client}, "master-m1-engine": {client},
        "node-h1": {client}, "engine-h1": {server}, "root": {client},
    }
    for stem, usages in expected.items():
        cert = load(pki / f"{stem}.crt")
        cert.verify_directly_issued_by(ca)
        assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) \
            == usages, stem
    sans = load(pki / "etcd-e1-server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]


def test_issue_needs_a_ca_a_good_name_and_hosts_for_servers(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="sigmad pki init"):
        issue(tmp_path, "root")
    init_ca(tmp_path)
    with pytest.raises(PkiError, match="--host"):
        issue(tmp_path, "node", "h1")
    with pytest.raises(PkiError, match="name 'a/b'"):
        issue(tmp_path, "node", "a/b", ("10.0.0.1",))
    with pytest.raises(PkiError, match="unknown kind"):
        issue(tmp_path, "proxy", "p", ("10.0.0.1",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


async def handshake(server: TlsFiles, client: ssl.SSLContext, hostname: str) -> str:
    """"ok" if a client with `client` completes a TLS exchange with a server presenting
    `server` (client certificates required), else the failure."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(2))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(server))
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname=hostname)
        writer.write(b"hi")
        got = await reader.read(2)  # TLS 1.3: a refused client certificate shows here
        writer.close()
        return "ok" if got == b"hi" else "refused"
    except (OSError, ssl.SSLError) as exc:
        return f"failed: {exc}"
    finally:
        listener.close()
        await listener.wait_closed()


async def test_engine_accepts_the_masters_client_certificate_only_with_tls(pki: Path) -> None:
    engine = files(pki, "engine-h1")
    master = client_context(files(pki, "master-m1-engine"))
    assert await handshake(engine, master, "127.0.0.1") == "ok"
    no_cert = client_context(TlsFiles(str(pki / "ca.crt")))
    assert await handshake(engine, no_cert, "127.0.0.1") != "ok"
    # A server certificate is not a client one (engine-h1 has no clientAuth).
    assert await handshake(engine, client_context(files(pki, "engine-h1")),
                           "127.0.0.1") != "ok"


async def test_a_client_refuses_a_server_of_another_ca_or_name(pki: Path,
                                                                 tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)
    issue(other, "node", "h1", ("127.0.0.1",))
    master = client_context(files(pki, "master-m1-engine"))
    assert "CERTIFICATE_VERIFY_FAILED" in await handshake(files(other, "engine-h1"), master,
                                                          "127.0.0.1")
    assert "CERTIFICATE_VERIFY_FAILED" in await handshake(files(pki, "engine-h1"), master,
                                                          "10.9.9.9")


def test_cli_init_says_what_it_wrote_and_refuses_a_second_ca(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    result = CliRunner().invoke(cli, ["pki", "init", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    assert f"wrote {d / 'ca.crt'}" in result.output and "(each file mode 0600)" in result.output
    again = CliRunner().invoke(cli, ["pki", "init", "--dir", str(d)])
    assert again.exit_code == 1 and "Use --force" in again.output
    node = CliRunner().invoke(cli, ["pki", "issue", "node", "h7", "--host", "10.0.0.7",
                                    "--dir", str(d)])
    assert node.exit_code == 0, node.output
    assert "to etcd as user sigma-node-h7" in node.output
    assert f"{d / 'engine-h7.crt'}" in node.output
