"""Child processes sigma runs for itself: etcd for `sigmad dev`, `sigmad lab` and the tests;
dockerd for `sigmad lab` and the tests."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

from sigmad.tls import TlsFiles

log = logging.getLogger(__name__)
AUTO_COMPACTION = "5m"  # history etcd keeps when it compacts by itself


class EtcdProcess:
    """A single-member etcd listening on 127.0.0.1 (and on the extra `hosts` addresses, e.g.
    a bridge address that other network namespaces reach), with its data under `data_dir`;
    `extra_args` go to etcd as they are (e.g. a bigger --quota-backend-bytes).

    With `tls` (the CA, and the server certificate and key), clients reach it over https
    only and must present a certificate the CA signed (--client-cert-auth: its common name
    is their etcd user); `peer_tls` does the same for its peer URL.

    It compacts its own history, keeping `history` of it (etcd's periodic auto-compaction:
    "5m", "1h"; "" for none), as the leader does too (sigmad.control.compaction)."""

    def __init__(
        self, data_dir: Path, client_port: int, peer_port: int, name: str = "sigma",
        hosts: tuple[str, ...] = (), extra_args: tuple[str, ...] = (),
        tls: TlsFiles | None = None, peer_tls: TlsFiles | None = None,
        history: str = AUTO_COMPACTION,
    ) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.name = name
        self.hosts = ("127.0.0.1", *(h for h in hosts if h != "127.0.0.1"))
        self.extra_args = extra_args
        self.tls, self.peer_tls = tls, peer_tls
        self.history = history
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        """Every client URL it listens on, 127.0.0.1 first."""
        return [f"{self.scheme}://{host}:{self.client_port}" for host in self.hosts]

    def _tls_args(self) -> list[str]:
        args = []
        if self.tls:
            args += ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                     "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        if self.peer_tls:
            args += ["--peer-cert-file", self.peer_tls.cert, "--peer-key-file",
                     self.peer_tls.key, "--peer-trusted-ca-file", self.peer_tls.ca,
                     "--peer-client-cert-auth"]
        return args

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"{'https' if self.peer_tls else 'http'}://127.0.0.1:{self.peer_port}"
        urls = ",".join(self.endpoints)
        args = [
            binary, "--name", self.name, "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", urls, "--advertise-client-urls", urls,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", *self._tls_args(), *self.extra_args,
        ]
        if self.history:
            args += ["--auto-compaction-mode=periodic",
                     f"--auto-compaction-retention={self.history}"]
        with open(self.data_dir / "etcd.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                args, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("etcd started (pid %d) on %s", self.proc.pid, self.endpoint)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until etcd accepts TCP connections on its client port."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}; see {self.data_dir / 'etcd.log'}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.client_port)
                writer.close()
                return
            except OSError:
                if loop.time() > deadline:
                    raise RuntimeError(f"etcd did not listen on {self.endpoint} in {timeout}s")\
                        from None
                await asyncio.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log.info("etcd stopped")


class DockerdProcess:
    """A dockerd of its own (data, exec root, socket under `root`), optionally inside a
    network namespace so its bridge and iptables rules touch nothing else."""

    def __init__(self, root: Path, exec_root: Path, netns: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.exec_root = exec_root  # short: containerd's socket paths must fit 108 bytes
        self.netns = netns
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        binary = shutil.which("dockerd")
        if binary is None:
            raise RuntimeError("dockerd is not installed: apt-get install docker.io")
        self.root.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--data-root", str(self.root / "data"), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "dockerd.pid"), "-H", self.url, *self.extra_args,
        ]
        if self.netns:
            # nsenter, not `ip netns exec`: that remounts /sys and dockerd loses its cgroups.
            args = ["nsenter", f"--net=/var/run/netns/{self.netns}", *args]
        with open(self.root / "dockerd.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                args, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the engine answers /_ping on its socket."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited with {self.proc.returncode}; see {self.root / 'dockerd.log'}"
                )
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket))
                writer.write(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = await reader.read(64)
                writer.close()
                if b" 200 " in answer:
                    return
            except OSError:
                pass
            if loop.time() > deadline:
                raise RuntimeError(f"dockerd did not answer on {self.socket} in {timeout}s")
            await asyncio.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
