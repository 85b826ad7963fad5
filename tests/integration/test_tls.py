"""TLS on real processes: etcd with client certificates and auth (plain text and a missing
certificate refused; an agent may write only its own node keys), a dockerd with --tlsverify
(no client certificate, no call), and a master serving HTTPS to sigmactl."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sigmad.engine import DockerEngine
from sigmad.errors import EngineError, StoreUnavailable
from sigmad.etcd_access import plan
from sigmad.pki import init_ca, issue
from sigmad.procs import DockerdProcess, EtcdProcess
from sigmad.store import EtcdStore, Keys
from sigmad.tls import TlsFiles, client_context
from tests.integration.conftest import REPO, free_port, stop_process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
PREFIX = "/sigma/v1"
KEYS = Keys(PREFIX)


def files(d: Path, stem: str) -> TlsFiles:
    return TlsFiles(str(d / "ca.crt"), str(d / f"{stem}.crt"), str(d / f"{stem}.key"))


class SecureEtcd:
    def __init__(self, pki: Path, proc: EtcdProcess) -> None:
        self.pki, self.proc = pki, proc
        self.endpoint = proc.endpoint

    def store(self, stem: str | None, retry_for: float = 3.0) -> EtcdStore:
        """A store as the user of DIR/`stem`.crt (None: only the CA, no certificate)."""
        tls = files(self.pki, stem) if stem else TlsFiles(str(self.pki / "ca.crt"))
        return EtcdStore([self.endpoint], PREFIX, retry_for=retry_for, rpc_timeout=1.0,
                         tls=tls)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root")
    d = tmp_path_factory.mktemp("tls") / "pki"
    init_ca(d)
    issue(d, "etcd", "t", ("127.0.0.1",))
    issue(d, "root")
    issue(d, "master", "m1", ("127.0.0.1",))
    for node in ("h1", "h2"):
        issue(d, "node", node, ("127.0.0.1",))
    return d


@pytest.fixture(scope="module")
def secure_etcd(pki: Path) -> Iterator[SecureEtcd]:
    """etcd serving https only with --client-cert-auth, auth on for masters, h1 and h2."""
    proc = EtcdProcess(pki.parent / "etcd", free_port(), free_port(), name="t",
                       tls=files(pki, "etcd-t-server"), peer_tls=files(pki, "etcd-t-peer"))
    proc.start()
    etcd = SecureEtcd(pki, proc)
    try:
        asyncio.run(proc.wait_ready())

        async def setup() -> list[str]:
            root = etcd.store("root", retry_for=10.0)
            try:
                return await root.apply_access(plan(KEYS, ["h1", "h2"]))
            finally:
                await root.close()

        steps = asyncio.run(setup())
        assert "auth enabled" in steps and "user sigma-node-h1" in steps, steps
        yield etcd
    finally:
        proc.stop()


async def test_etcd_refuses_plain_text_and_clients_without_a_certificate(
    secure_etcd: SecureEtcd,
) -> None:
    plain = EtcdStore([f"http://127.0.0.1:{secure_etcd.proc.client_port}"], PREFIX,
                      retry_for=1.0, rpc_timeout=0.5)
    anonymous = secure_etcd.store(None, retry_for=1.0)
    master = secure_etcd.store("master-m1-etcd")
    try:
        for store in (plain, anonymous):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await store.put(KEYS.node("h1"), {"by": "nobody"})
        key = KEYS.prefix + "/tls-test"
        await master.put(key, {"by": "master"})
        item = await master.get_raw(key)
        assert item is not None and item.value == b'{"by":"master"}'
    finally:
        for store in (plain, anonymous, master):
            await store.close()


async def test_an_agent_cannot_write_another_nodes_keys(secure_etcd: SecureEtcd) -> None:
    h1, master = secure_etcd.store("node-h1"), secure_etcd.store("master-m1-etcd")
    try:
        # Its own record and leased heartbeat, its events, and reads of the cluster: yes.
        assert await h1.create(KEYS.node("h1"), {"name": "h1"}) or \
            await h1.get_raw(KEYS.node("h1")) is not None
        lease = await h1.grant(5)
        await h1.put(KEYS.heartbeat("h1"), {"node": "h1"}, lease=lease)
        await h1.put(KEYS.usage("h1"), {"node": "h1"}, lease=lease)  # its usage sample
        await h1.put(KEYS.events() + "1-1", {"message": "hello"}, lease=lease)
        await h1.revoke(lease)
        await master.put(KEYS.node("h2"), {"name": "h2"})
        assert await h1.get_raw(KEYS.node("h2")) is not None
        # Another node's keys, or anything the masters own: refused, nothing written.
        for key in (KEYS.node("h2"), KEYS.heartbeat("h2"), KEYS.usage("h2"),
                    KEYS.instance("default", "web", 0),
                    KEYS.ip("10.244.0.9"), KEYS.leader()):
            with pytest.raises(StoreUnavailable, match="permission denied"):
                await h1.put(key, {"forged": True})
        with pytest.raises(StoreUnavailable, match="permission denied"):
            await h1.delete(KEYS.node("h2"))
        item = await master.get_raw(KEYS.node("h2"))
        assert item is not None and b"forged" not in item.value
        assert await master.get_raw(KEYS.heartbeat("h2")) is None
        assert await master.get_raw(KEYS.instance("default", "web", 0)) is None
    finally:
        for key in (KEYS.node("h1"), KEYS.node("h2")):  # not records a master could read
            await master.delete(key)
        await h1.close()
        await master.close()


def test_etcd_auth_again_adds_a_node(pki: Path, secure_etcd: SecureEtcd) -> None:
    """`sigmad pki etcd-auth` run again (a new node h3) keeps what is there and adds h3,
    which may then write its own record (and still not h1's)."""
    issue(pki, "node", "h3", ("127.0.0.1",))
    result = subprocess.run(
        [sys.executable, "-m", "sigmad", "pki", "etcd-auth", "--etcd", secure_etcd.endpoint,
         "--prefix", PREFIX, "--node", "h1", "--node", "h2", "--node", "h3", "--dir", str(pki)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "user sigma-node-h3" in result.stdout and "user sigma-node-h1" not in result.stdout

    async def check() -> None:
        h3, master = secure_etcd.store("node-h3"), secure_etcd.store("master-m1-etcd")
        try:
            assert await h3.create(KEYS.heartbeat("h3"), {"node": "h3"})
            with pytest.raises(StoreUnavailable, match="permission denied"):
                await h3.put(KEYS.heartbeat("h1"), {"node": "h1"})
        finally:
            await master.delete(KEYS.heartbeat("h3"))
            await h3.close()
            await master.close()

    asyncio.run(check())


def plain_http(port: int, path: str, token: str = "") -> bytes:
    """What a plain-text HTTP GET of `path` on 127.0.0.1:`port` gets back (b"" if the
    connection is dropped)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
            return s.recv(200)
    except OSError:
        return b""


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_dockerd(pki: Path) -> Iterator[str]:
    """A dockerd (no bridge, no iptables) serving tcp://127.0.0.1:PORT with --tlsverify and
    the engine certificate of h1; its URL."""
    port = _free_local_port()
    root = pki.parent / "docker"
    exec_root = Path(f"/run/sigma-tls-{os.getpid()}")
    server = files(pki, "engine-h1")
    proc = DockerdProcess(root, exec_root, extra_args=(
        "--bridge=none", "--iptables=false", "--ip-masq=false",
        "-H", f"tcp://127.0.0.1:{port}", "--tlsverify", "--tlscacert", server.ca,
        "--tlscert", server.cert, "--tlskey", server.key))
    proc.start()
    try:
        asyncio.run(proc.wait_ready())
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.stop()
        shutil.rmtree(exec_root, ignore_errors=True)


async def test_a_tls_engine_answers_only_clients_with_a_certificate(pki: Path,
                                                                     tls_dockerd: str) -> None:
    master = DockerEngine(tls_dockerd, tls=client_context(files(pki, "master-m1-engine")))
    anonymous = DockerEngine(tls_dockerd, tls=client_context(TlsFiles(str(pki / "ca.crt"))))
    plain = DockerEngine(tls_dockerd)
    try:
        info = await master.info()
        assert info["ServerVersion"]
        with pytest.raises(EngineError, match="is unreachable"):
            await anonymous.ping()
        with pytest.raises(EngineError, match="refusing plain TCP"):
            await plain.ping()
    finally:
        for engine in (master, anonymous, plain):
            await engine.close()
    # What a plain client gets from the port itself: no Engine API.
    answer = plain_http(int(tls_dockerd.rpartition(":")[2]), "/_ping")
    assert b"200 OK" not in answer and b"OK" not in answer.split(b"\r\n\r\n", 1)[-1]


def test_the_master_serves_https_that_sigmactl_verifies(pki: Path, secure_etcd: SecureEtcd,
                                                        tmp_path: Path) -> None:
    port = free_port()
    token = secrets.token_hex(16)  # (a weak token such as "t" * 32 is refused)
    api = files(pki, "master-m1-api")
    config = tmp_path / "master.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "token": token,
        "etcd": {"endpoints": [secure_etcd.endpoint], "prefix": PREFIX,
                 **vars(files(pki, "master-m1-etcd"))},
        "tls": {"cert": api.cert, "key": api.key},
        "engine_tls": vars(files(pki, "master-m1-engine")),
    }))
    log = open(tmp_path / "master.log", "ab")  # noqa: SIM115 - closed below
    master = subprocess.Popen([sys.executable, "-m", "sigmad", "master", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    log.close()
    server = f"https://127.0.0.1:{port}"

    def ctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sigmactl", *args], capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), "SIGMA_SERVER": server,
                             "SIGMA_TOKEN": token,
                             "SIGMA_CREDENTIALS": str(tmp_path / "none.json"), **env})

    try:
        def advertised() -> Any:
            # The API answers before the master has registered itself: wait for its record.
            result = ctl("get", "masters", SIGMA_CA=str(pki / "ca.crt"))
            return result if result.returncode == 0 and server in result.stdout else None

        # it answers over HTTPS, verified against the CA, and advertises its https:// URL
        wait_for(advertised, 30, f"the master over HTTPS (log: {tmp_path / 'master.log'})")
        untrusted = ctl("get", "nodes")
        assert untrusted.returncode != 0 and "is not trusted" in untrusted.stderr
        with pytest.raises(ssl.SSLError):  # nothing answers plain HTTP on that port
            ssl_context = ssl.create_default_context()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ssl_context.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass
        assert b"200 OK" not in plain_http(port, "/v1/nodes", token)
    finally:
        stop_process(master)
