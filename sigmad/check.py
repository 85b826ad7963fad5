"""`sigmad master --check` and `sigmad node --check`: the config and the environment a master
or an agent needs, each finding with what to fix.

Invariants: a check only reads (and writes one probe file into the agent's data directory,
removed at once); each outside call is bounded by `timeout`; a failure of one check never
hides the others. FAIL findings make the command exit non-zero; WARN ones do not.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from sigmad import schema
from sigmad.config import MasterConfig, NodeConfig
from sigmad.engine import DockerEngine
from sigmad.errors import SigmaError
from sigmad.node import dockerd
from sigmad.node.agent import NodeRefused, check_engine
from sigmad.store import EtcdStore
from sigmad.tls import TlsFiles, client_context

OK, WARN, FAIL = "ok", "WARN", "FAIL"
EXPIRES_SOON = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Finding:
    level: str  # OK, WARN or FAIL
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<4}  {self.what}" + (f"\n      fix: {self.fix}" if self.fix else "")


def certificate(role: str, files: TlsFiles | None, now: datetime.datetime | None = None
                ) -> list[Finding]:
    """Each file of `files` readable; each certificate valid now and for 30 days more."""
    if files is None:
        return []
    now = now or datetime.datetime.now(datetime.UTC)
    out = []
    for kind, path in (("CA", files.ca), ("certificate", files.cert), ("key", files.key)):
        if not path:
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            out.append(Finding(FAIL, f"{role} {kind} {path} unreadable: {exc.strerror}",
                               "make it (sigmad pki issue ...) or fix the path in the config"))
            continue
        if kind == "key":
            mode = stat.S_IMODE(os.stat(path).st_mode)
            out.append(Finding(WARN, f"{role} key {path} has mode {mode:o}",
                               f"chmod 600 {path}") if mode & 0o077 else
                       Finding(OK, f"{role} key {path} readable, mode {mode:o}"))
            continue
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError:
            out.append(Finding(FAIL, f"{role} {kind} {path} is not a PEM certificate",
                               "point the config at the .crt file"))
            continue
        ends = cert.not_valid_after_utc
        if ends <= now or cert.not_valid_before_utc > now:
            out.append(Finding(FAIL, f"{role} {kind} {path} is not valid now (valid "
                               f"{cert.not_valid_before_utc:%Y-%m-%d} to {ends:%Y-%m-%d})",
                               "issue a new one: sigmad pki issue ... (see README, TLS)"))
        elif ends - now < EXPIRES_SOON:
            out.append(Finding(WARN, f"{role} {kind} {path} expires {ends:%Y-%m-%d}",
                               "issue a new one before then: sigmad pki issue ..."))
        else:
            out.append(Finding(OK, f"{role} {kind} {path} valid until {ends:%Y-%m-%d}"))
    return out


async def etcd(endpoints: list[str], prefix: str, tls: TlsFiles | None,
               timeout: float) -> list[Finding]:
    """etcd answers, and the schema under the prefix is one this sigmad may lead over."""
    store = EtcdStore(endpoints, prefix, retry_for=timeout, rpc_timeout=timeout, tls=tls)
    where = ", ".join(endpoints)
    try:
        revision = await asyncio.wait_for(store.ping(), timeout * 2)
        version, restoring = await asyncio.wait_for(schema.read(store), timeout * 2)
    except (SigmaError, TimeoutError, OSError) as exc:
        return [Finding(FAIL, f"etcd {where} does not answer: "
                              f"{_said(exc)}",
                        "start etcd, or fix etcd.endpoints and its ca/cert/key in the "
                        "config (https:// needs all three)")]
    finally:
        await store.close()
    out = [Finding(OK, f"etcd {where} answers (revision {revision})")]
    why = schema.refusal(version, restoring)
    if why:
        out.append(Finding(FAIL, f"schema under {prefix}: {why}"))
    elif version is None:
        out.append(Finding(OK, f"schema under {prefix}: none yet (the first leader writes "
                               f"version {schema.VERSION})"))
    else:
        out.append(Finding(OK, f"schema under {prefix}: version {version} (this sigmad: "
                               f"{schema.VERSION})"))
    return out


def _said(exc: BaseException) -> str:
    """What a failed call said (a SigmaError's message, else the exception's text or type)."""
    return str(getattr(exc, "message", "") or exc) or type(exc).__name__


def listen_free(listen: str) -> Finding:
    host, _, port = listen.rpartition(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as exc:
            return Finding(WARN, f"listen {listen}: cannot bind ({exc.strerror})",
                           "a master already runs there, or pick another listen address")
    return Finding(OK, f"listen {listen} is free")


def writable_dir(what: str, directory: Path) -> Finding:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sigma-check-"):
            pass
    except OSError as exc:
        return Finding(FAIL, f"{what} {directory} not writable: {exc.strerror}",
                       f"create it and make it writable by sigmad (root): "
                       f"install -d -m 700 {directory}")
    return Finding(OK, f"{what} {directory} writable")


async def engine(config: NodeConfig, timeout: float) -> list[Finding]:
    """The engine answers, and has the settings production wants (sigmad.node.agent)."""
    client = DockerEngine(config.engine, cluster=config.etcd.prefix,
                          tls=client_context(config.engine_tls) if config.engine_tls else None)
    try:
        info = await asyncio.wait_for(client.info(), timeout)
    except (SigmaError, TimeoutError, OSError) as exc:
        return [Finding(FAIL, f"engine {config.engine} does not answer: "
                              f"{_said(exc)}",
                        "start dockerd (systemctl start docker), or fix engine and "
                        "engine_tls in the config")]
    finally:
        await client.close()
    out = [Finding(OK, f"engine {config.engine} answers (Docker {info.get('ServerVersion')}, "
                       f"{info.get('NCPU')} cpus, {int(str(info.get('MemTotal', 0))) >> 20} "
                       "MiB)")]
    try:
        proxy = await asyncio.to_thread(dockerd.userland_proxy, config.engine)
        out += [Finding(WARN, w) for w in check_engine(config.engine, info, proxy)]
    except NodeRefused as exc:
        out.append(Finding(FAIL, exc.message))
    return out


def ssds(devices: list[str]) -> list[Finding]:
    out = []
    for d in devices:
        try:
            is_block = stat.S_ISBLK(os.stat(d).st_mode)
        except OSError as exc:
            out.append(Finding(FAIL, f"ssd {d}: {exc.strerror}",
                               "fix the ssds list of the config (stable paths only)"))
            continue
        out.append(Finding(OK, f"ssd {d} is a block device") if is_block else
                   Finding(FAIL, f"ssd {d} is not a block device", "list whole disks only"))
    return out


async def master(config: MasterConfig, timeout: float = 3.0) -> list[Finding]:
    out = [Finding(OK, f"config parsed (listen {config.listen}, etcd prefix "
                       f"{config.etcd.prefix})")]
    out += certificate("API", config.tls)
    if config.tls is None:
        out.append(Finding(WARN, "the API serves plain HTTP: tokens cross the network in "
                                 "clear", "add tls: {cert, key} (sigmad pki issue master)"))
    out += certificate("etcd client", config.etcd.tls)
    out += certificate("engine client", config.engine_tls)
    out += await etcd(config.etcd.endpoints, config.etcd.prefix, config.etcd.tls, timeout)
    out.append(listen_free(config.listen))
    if config.audit_log:
        out.append(writable_dir("audit_log's directory", Path(config.audit_log).parent))
    return out


async def node(config: NodeConfig, timeout: float = 3.0) -> list[Finding]:
    out = [Finding(OK, f"config parsed (node {config.name}, etcd prefix "
                       f"{config.etcd.prefix})")]
    if not config.address:
        out.append(Finding(WARN, "address is empty: the overlay cannot reach this host",
                           "set address: to this host's underlay IP"))
    out += certificate("engine client", config.engine_tls)
    out += certificate("etcd client", config.etcd.tls)
    out += await etcd(config.etcd.endpoints, config.etcd.prefix, config.etcd.tls, timeout)
    out += await engine(config, timeout)
    out.append(writable_dir("data_dir", Path(config.data_dir)))
    out += ssds(config.ssds)
    return out


def report(findings: list[Finding], say: Callable[[str], None]) -> bool:
    """Print every finding and a verdict; whether none failed."""
    for f in findings:
        say(f.line())
    failed = sum(1 for f in findings if f.level == FAIL)
    warned = sum(1 for f in findings if f.level == WARN)
    say(f"{failed} to fix, {warned} warnings" if failed or warned else "all checks passed")
    return not failed
