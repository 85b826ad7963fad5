"""TLS in the configs (what is refused at load, with the field named), in the etcd store and
the engine client (never plain text where TLS is asked for), and in sigmactl (an https://
server verified against the CA)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sigmactl.client import Client, CtlError, ca_path
from sigmad.config import master_config, node_config
from sigmad.engine import DockerEngine
from sigmad.errors import EngineError, SpecError
from sigmad.pki import init_ca, issue
from sigmad.spec import Fields
from sigmad.store import EtcdStore
from sigmad.tls import TlsFiles, client_context, server_context
from tests.unit.test_sigmactl_client import TOKEN, Fake, QuietServer, _handler

TOKEN16 = "9f3c1e7a5b2d8046"  # 16 characters, no pattern (a weak token is refused)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "pki"
    init_ca(d)
    issue(d, "master", "m1", ("127.0.0.1",))
    issue(d, "node", "h1", ("127.0.0.1",))
    return d


def section(d: Path, stem: str) -> dict[str, str]:
    return {"ca": str(d / "ca.crt"), "cert": str(d / f"{stem}.crt"),
            "key": str(d / f"{stem}.key")}


def files(d: Path, stem: str) -> TlsFiles:
    return TlsFiles(**section(d, stem))


def node_error(**doc: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        node_config(Fields("", doc, ""))
    return info.value


def master_error(**doc: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        master_config(Fields("", {"token": TOKEN16, **doc}, ""))
    return info.value


# --- configs ---------------------------------------------------------------------------------


def test_a_tcp_engine_without_certificates_is_refused_at_load() -> None:
    err = node_error(engine="tcp://10.0.0.5:2375")
    assert err.field == "engine_tls"
    assert "plain TCP engine gives root on this host" in err.message
    assert "sigmad pki issue node" in err.message


def test_a_tcp_engine_with_certificates_is_taken(pki: Path) -> None:
    cfg = node_config(Fields("", {"engine": "tcp://10.0.0.5:2376",
                                  "engine_tls": section(pki, "node-h1")}, ""))
    assert cfg.engine_tls == files(pki, "node-h1")


def test_engine_tls_needs_every_file_and_only_for_tcp(pki: Path) -> None:
    tcp = "tcp://10.0.0.5:2376"
    partial = {"ca": str(pki / "ca.crt")}
    assert node_error(engine=tcp, engine_tls=partial).field == "engine_tls.cert"
    no_ca = {k: v for k, v in section(pki, "node-h1").items() if k != "ca"}
    assert node_error(engine=tcp, engine_tls=no_ca).field == "engine_tls.ca"
    unix = node_error(engine="unix:///run/docker.sock", engine_tls=section(pki, "node-h1"))
    assert unix.field == "engine_tls" and "only for tcp://" in unix.message


def test_unusable_files_are_named(pki: Path, tmp_path: Path) -> None:
    tcp = "tcp://10.0.0.5:2376"
    missing = {**section(pki, "node-h1"), "cert": str(tmp_path / "nope.crt")}
    err = node_error(engine=tcp, engine_tls=missing)
    assert err.field == "engine_tls.cert" and "no such file" in err.message
    shared = tmp_path / "shared.key"
    shared.write_bytes((pki / "node-h1.key").read_bytes())
    shared.chmod(0o644)
    err = node_error(engine=tcp, engine_tls={**section(pki, "node-h1"), "key": str(shared)})
    assert err.field == "engine_tls.key" and f"chmod 600 {shared}" in err.message
    other = {**section(pki, "node-h1"), "key": str(pki / "master-m1-api.key")}
    err = node_error(engine=tcp, engine_tls=other)
    assert err.field == "engine_tls.cert" and "not a PEM certificate and its key" in err.message
    not_a_ca = {**section(pki, "node-h1"), "ca": str(pki / "node-h1.key")}
    assert node_error(engine=tcp, engine_tls=not_a_ca).field == "engine_tls.ca"


def test_https_etcd_needs_the_ca_and_http_takes_none(pki: Path) -> None:
    err = node_error(etcd={"endpoints": ["https://10.0.0.1:2379"]})
    assert err.field == "etcd.endpoints" and "https:// needs the CA" in err.message
    err = node_error(etcd={"endpoints": ["http://10.0.0.1:2379"], **section(pki, "node-h1")})
    assert err.field == "etcd.endpoints" and "plain text" in err.message
    err = node_error(etcd={"endpoints": ["https://a:2379", "http://b:2379"],
                           **section(pki, "node-h1")})
    assert err.field == "etcd.endpoints" and "mixes" in err.message
    err = node_error(etcd={"endpoints": ["https://a:2379"], "ca": str(pki / "ca.crt"),
                           "cert": str(pki / "node-h1.crt")})
    assert err.field == "etcd.key"
    cfg = node_config(Fields("", {"etcd": {"endpoints": ["https://10.0.0.1:2379"],
                                           **section(pki, "node-h1")}}, ""))
    assert cfg.etcd.tls == files(pki, "node-h1")


def test_master_tls_serves_https_and_takes_an_engine_client(pki: Path) -> None:
    api = section(pki, "master-m1-api")
    cfg = master_config(Fields("", {
        "token": TOKEN16, "listen": "127.0.0.1:7475",
        "tls": {"cert": api["cert"], "key": api["key"]},
        "engine_tls": section(pki, "master-m1-engine")}, ""))
    assert cfg.api_url() == "https://127.0.0.1:7475"
    assert cfg.engine_tls == files(pki, "master-m1-engine")
    assert master_error(tls=api).field == "tls.ca"
    assert master_error(tls={"cert": api["cert"]}).field == "tls.key"
    assert master_error(engine_tls={"ca": api["ca"]}).field == "engine_tls.cert"


# --- etcd store ------------------------------------------------------------------------------


def test_the_store_never_reaches_https_etcd_in_plain_text(pki: Path) -> None:
    with pytest.raises(ValueError, match="https:// needs the CA"):
        EtcdStore(["https://127.0.0.1:2379"])
    with pytest.raises(ValueError, match="plain text"):
        EtcdStore(["http://127.0.0.1:2379"], tls=files(pki, "node-h1"))


# --- engine client ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine_stub(tls: ssl.SSLContext | None) -> AsyncIterator[tuple[str, list[str]]]:
    """A Docker engine stub on 127.0.0.1 (over TLS with `tls`): answers /version and /_ping;
    yields its tcp:// URL and the request lines it got."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n")[0].decode()
                seen.append(line)
                body = b'{"ApiVersion": "1.41"}' if "/version" in line else b"OK"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_tcp_engine_without_tls_is_refused_before_connecting() -> None:
    async with engine_stub(None) as (url, seen):
        engine = DockerEngine(url)
        with pytest.raises(EngineError, match="refusing plain TCP"):
            await engine.ping()
        await engine.close()
        assert seen == []


async def test_a_tcp_engine_over_tls_with_a_client_certificate(pki: Path) -> None:
    server = server_context(TlsFiles(str(pki / "ca.crt"), str(pki / "master-m1-api.crt"),
                                     str(pki / "master-m1-api.key")))
    async with engine_stub(server) as (url, seen):
        engine = DockerEngine(url, tls=client_context(files(pki, "master-m1-engine")))
        await engine.ping()
        await engine.close()
        assert seen == ["GET /version HTTP/1.1", "GET /v1.41/_ping HTTP/1.1"]
        anonymous = DockerEngine(url, tls=client_context(TlsFiles(str(pki / "ca.crt"))))
        with pytest.raises(EngineError, match="is unreachable"):
            await anonymous.ping()
        await anonymous.close()
        assert len(seen) == 2


# --- sigmactl --------------------------------------------------------------------------------


@contextlib.contextmanager
def https_fake(pki: Path) -> Iterator[Fake]:
    state = Fake()
    server = QuietServer(("127.0.0.1", 0), _handler(state))
    context = server_context(TlsFiles("", str(pki / "master-m1-api.crt"),
                                      str(pki / "master-m1-api.key")))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_sigmactl_verifies_an_https_server_with_the_ca(pki: Path) -> None:
    with https_fake(pki) as fake:
        fake.answer("GET", "/v1/nodes", (200, {"items": []}))
        assert Client(fake.url, TOKEN, ca=str(pki / "ca.crt")).get("/v1/nodes") == {"items": []}
        with pytest.raises(CtlError, match=r"is not trusted by the system.s CAs .* SIGMA_CA"):
            Client(fake.url, TOKEN).get("/v1/nodes")
        assert len(fake.seen) == 1  # the untrusted server was never sent the token


def test_the_ca_comes_from_sigma_ca_else_the_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    credentials = Path(os.environ["SIGMA_CREDENTIALS"])
    assert ca_path() is None
    credentials.write_text(json.dumps({"server": "https://x", "token": "t", "ca": "/c/ca.crt"}))
    assert ca_path() == "/c/ca.crt"
    monkeypatch.setenv("SIGMA_CA", "/env/ca.crt")
    assert ca_path() == "/env/ca.crt"


# --- the lab's configs -----------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False])
def test_the_labs_configs_load_with_and_without_tls(tmp_path: Path, tls: bool) -> None:
    from sigmad.config import load_master, load_node
    from sigmad.lab import LabConfig, services, trust
    from sigmad.lab.state import HostState

    cfg = LabConfig(name="t", dir=tmp_path / "lab", hosts=1, tls=tls)
    cfg.root.mkdir()
    host = HostState(name="h1", netns="t-h1", veth="t-h1", address=cfg.host_address(1),
                     root=str(cfg.root / "h1"), engine=f"unix://{cfg.root}/h1/docker.sock",
                     exec_root="/run/x", cgroup_parent="x")
    Path(host.root).mkdir()
    if tls:
        trust.make_pki(cfg, [host])
    services.write_master_config(cfg, TOKEN16, cfg.listen, cfg.root / "master.yaml", 1)
    services.write_node_config(cfg, host, 1)
    master, node = load_master(cfg.root / "master.yaml"), load_node(host.node_config)
    scheme = "https" if tls else "http"
    assert master.api_url() == f"{scheme}://{cfg.listen}"
    assert master.etcd.endpoints == [f"{scheme}://127.0.0.1:{cfg.etcd_port}"]
    assert node.etcd.endpoints == [f"{scheme}://{cfg.bridge_ip}:{cfg.etcd_port}"]
    assert node.engine == (f"tcp://{host.address}:2376" if tls else host.engine)
    assert (master.etcd.tls is not None, master.engine_tls is not None,
            node.etcd.tls is not None, node.engine_tls is not None) == (tls,) * 4
    dockerd = services.dockerd(host, cfg.registry_addr, cfg.root if tls else None)
    assert ("--tlsverify" in dockerd.extra_args) is tls
