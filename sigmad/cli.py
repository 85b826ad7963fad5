"""`sigmad master | node | restore | dev | lab | pki`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sigmad import __version__
from sigmad.config import DEFAULT_ENGINE, DEFAULT_LISTEN, load_master, load_node
from sigmad.errors import SigmaError

if TYPE_CHECKING:
    from sigmad.lab import Lab

T = TypeVar("T")


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` until it ends or SIGINT/SIGTERM arrives; then cancel it and clean up."""

    async def wrapper() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger("sigmad").info("stopped")

    try:
        asyncio.run(wrapper())
    except SigmaError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(__version__)
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]),
              help="json: one JSON object a line (time, level, logger, message).")
def cli(log_level: str, log_format: str) -> None:
    """Sigma daemon: one pool of hosts used as one big server."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON: time (epoch seconds), level, logger, message and,
    for an exception, its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _load(loader: Any, path: str) -> Any:
    try:
        return loader(path)
    except SigmaError as exc:
        raise click.ClickException(f"{path}: {exc.message}") from None


_CHECK = click.option("--check", is_flag=True,
                      help="Check the config and the environment (etcd, certificates, ...), "
                           "print what to fix and exit: 0 when nothing must be fixed.")


def _check(findings: Coroutine[Any, Any, list[Any]]) -> None:
    from sigmad.check import report

    sys.exit(0 if report(asyncio.run(findings), click.echo) else 1)


@cli.command()
@click.option("--config", "config_path", default="/etc/sigma/master.yaml", show_default=True)
@_CHECK
def master(config_path: str, check: bool) -> None:
    """Run the master: API, controller and scheduler."""
    config = _load(load_master, config_path)
    if check:
        from sigmad import check as checks

        _check(checks.master(config))
    from sigmad.master import run_master

    _run(run_master(config))


@cli.command()
@click.option("--config", "config_path", default="/etc/sigma/node.yaml", show_default=True)
@_CHECK
def node(config_path: str, check: bool) -> None:
    """Run the node agent of this host."""
    config = _load(load_node, config_path)
    if check:
        from sigmad import check as checks

        _check(checks.node(config))
    from sigmad.node.agent import run_agent

    _run(run_agent(config))


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", default="/etc/sigma/master.yaml", show_default=True,
              help="a master's config: its etcd section says where to write")
@click.option("--force", is_flag=True,
              help="delete every key under the prefix first (it must be empty otherwise)")
def restore(file: Path, config_path: str, force: bool) -> None:
    """Write a backup (sigmactl backup -o FILE) into etcd under the config's prefix.

    Stop every master and agent first. After it, start the agents (their heartbeats say
    their nodes are Ready), then the masters: they adopt the containers that run (by their
    labels) and start no copies."""
    from sigmad import backup
    from sigmad.store import EtcdStore

    config = _load(load_master, config_path)
    try:
        taken = backup.decode(file.read_bytes())
    except SigmaError as exc:
        raise click.ClickException(f"{file}: {exc.message}") from None

    async def main() -> None:
        store = EtcdStore(config.etcd.endpoints, config.etcd.prefix, tls=config.etcd.tls)
        try:
            done = await backup.restore(store, taken, force,
                                        lambda line: click.echo(line, err=True))
        finally:
            await store.close()
        click.echo(f"restored {done.written} keys of revision {taken.revision} (taken under "
                   f"{taken.prefix}) into {config.etcd.prefix}; {done.skipped} leased keys "
                   f"left out" + (f"; {done.deleted} keys deleted first" if done.deleted
                                  else "") + ". Start the agents, then the masters.")

    _run(main())


@cli.command()
@click.option("--data-dir", type=click.Path(path_type=Path),
              default=Path.home() / ".sigma" / "dev", show_default=True)
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@click.option("--engine", default=DEFAULT_ENGINE, show_default=True)
@click.option("--etcd-port", default=12379, show_default=True, type=int,
              help="etcd client port (the peer port is the next one)")
@click.option("--name", default=socket.gethostname(), show_default=True, help="node name")
def dev(data_dir: Path, listen: str, engine: str, etcd_port: int, name: str) -> None:
    """All-in-one on this machine: etcd, a master and a node agent for the local engine."""
    from sigmad.dev import run_dev

    _run(run_dev(data_dir, listen, engine, etcd_port, name))


@cli.group()
def pki() -> None:
    """The cluster's CA and the certificates of etcd, masters, agents and engines (TLS
    everywhere), and etcd's users and roles."""


def _pki_dir(func: Any) -> Any:
    from sigmad.pki import DEFAULT_DIR

    return click.option("--dir", "directory", type=click.Path(path_type=Path),
                        default=DEFAULT_DIR, show_default=True,
                        help="the pki directory (made 0700)")(func)


def _say_written(written: list[Any]) -> None:
    width = max(len(str(w.path)) for w in written)
    for w in written:
        click.echo(f"wrote {w.path!s:<{width}}  {w.purpose}")
    click.echo("(each file mode 0600)")


@pki.command("init")
@_pki_dir
@click.option("--force", is_flag=True, help="replace an existing CA (every certificate it "
              "signed stops being trusted)")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
@click.option("--name", default="sigma", show_default=True, help="the CA's name")
def pki_init(directory: Path, force: bool, days: int, name: str) -> None:
    """Make the cluster's CA: DIR/ca.crt and DIR/ca.key."""
    from sigmad.pki import PkiError, init_ca

    try:
        _say_written(init_ca(directory, force=force, days=days, name=name))
    except PkiError as exc:
        raise click.ClickException(str(exc)) from None


@pki.command("issue")
@click.argument("kind", type=click.Choice(["etcd", "master", "node", "root"]))
@click.argument("name", required=False, default="")
@click.option("--host", "hosts", multiple=True,
              help="an address or DNS name the part is reached at (repeatable; etcd, "
                   "master and node need at least one)")
@_pki_dir
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500))
def pki_issue(kind: str, name: str, hosts: tuple[str, ...], directory: Path,
              days: int) -> None:
    """Sign the certificates of one part with the CA in DIR.

    \b
    etcd NAME    etcd member NAME: server (clients) and peer certificates
    master NAME  master NAME: HTTPS API, etcd client (user sigma-master), engines' client
    node NAME    node NAME: the agent's client (etcd user sigma-node-NAME; its engine) and
                 the dockerd server certificate (--tlsverify)
    root         etcd user root, for 'sigmad pki etcd-auth' only"""
    from sigmad.pki import PkiError, issue

    try:
        _say_written(issue(directory, kind, name, hosts, days))
    except PkiError as exc:
        raise click.ClickException(str(exc)) from None


@pki.command("etcd-auth")
@click.option("--etcd", "etcd_url", required=True,
              help="etcd endpoint(s), https://, comma-separated")
@click.option("--prefix", default="/sigma/v1", show_default=True, help="etcd key prefix")
@click.option("--node", "nodes", multiple=True, help="a node's name (repeatable)")
@_pki_dir
def pki_etcd_auth(etcd_url: str, prefix: str, nodes: tuple[str, ...], directory: Path) -> None:
    """Make etcd's users and roles and enable auth (as root: DIR/root.crt): masters may
    write the prefix, each node's agent only its own node record and heartbeat. Run it
    again to add nodes."""
    from sigmad.etcd_access import plan
    from sigmad.store import EtcdStore, Keys
    from sigmad.tls import TlsFiles

    tls = TlsFiles(str(directory / "ca.crt"), str(directory / "root.crt"),
                   str(directory / "root.key"))
    for path in (tls.ca, tls.cert, tls.key):
        if not Path(path).exists():
            raise click.ClickException(f"{path} is missing: run 'sigmad pki init' and "
                                       "'sigmad pki issue root' first")

    async def apply() -> list[str]:
        store = EtcdStore(etcd_url.split(","), prefix, retry_for=10.0, tls=tls)
        try:
            return await store.apply_access(plan(Keys(prefix), list(nodes)))
        finally:
            await store.close()

    try:
        for step in asyncio.run(apply()):
            click.echo(step)
    except (SigmaError, ValueError) as exc:
        raise click.ClickException(str(getattr(exc, "message", exc))) from None


@cli.group()
def lab() -> None:
    """Several test hosts on one Linux machine (root only): netns + dockerd + agent each, an
    underlay bridge, etcd, a registry and a master."""


def _lab_options(func: Any) -> Any:
    func = click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
                        help="lab directory [default: /var/lib/sigma-lab/NAME]")(func)
    return click.option("--name", default="sigma", show_default=True, help="lab name")(func)


def _lab_call(action: Callable[[], T]) -> T:
    """Run `action()` as root; a LabError is printed and exits 1."""
    from sigmad.lab import LabError

    if os.geteuid() != 0:
        click.echo("error: sigmad lab needs root (it creates namespaces, links and dockerds)",
                   err=True)
        sys.exit(1)
    try:
        return action()
    except LabError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def _open_lab(name: str, directory: Path | None) -> Lab:
    from sigmad.lab import Lab

    return Lab.open(name, directory, out=click.echo)


@lab.command("up")
@click.option("--hosts", default=3, show_default=True, type=int, help="number of hosts")
@_lab_options
@click.option("--subnet", default="10.77.0.0/24", show_default=True,
              help="underlay: the bridge takes .1, host hI takes .(10+I)")
@click.option("--overlay-cidr", default="10.244.0.0/16", show_default=True)
@click.option("--etcd-port", default=12479, show_default=True, type=int,
              help="etcd client port (the peer port is the next one)")
@click.option("--registry-port", default=5000, show_default=True, type=int)
@click.option("--listen", default="127.0.0.1:7575", show_default=True,
              help="master API (more masters take the next ports)")
@click.option("--masters", default=1, show_default=True, type=int,
              help="number of masters (2: an HA pair, one leader and one standby)")
@click.option("--heartbeat-ttl", default=5, show_default=True, type=int)
@click.option("--port-range", default="31000-31099", show_default=True,
              help="host ports of each node")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="etcd (client certificates, per-node users), engines (--tlsverify) and "
                   "the API (HTTPS) over TLS, with a CA of the lab's own")
@click.option("--ssds", default=0, show_default=True, type=int,
              help="SSDs per host: loop devices over sparse files, removed by `lab down`")
@click.option("--ssd-size", default="10Gi", show_default=True,
              help="size of each (sparse: only what is written takes space)")
@click.option("--cpu", default="", help="cpu of each host, e.g. 2 or 500m: its engine's "
              "cgroup parent is capped at it and its node reports it [default: the machine's "
              "cpus / hosts]")
@click.option("--memory", default="", help="memory of each host, e.g. 4Gi: capped and "
              "reported likewise [default: the machine's memory / hosts]")
def lab_up(hosts: int, name: str, directory: Path | None, subnet: str, overlay_cidr: str,
           etcd_port: int, registry_port: int, listen: str, masters: int, heartbeat_ttl: int,
           port_range: str, tls: bool, ssds: int, ssd_size: str, cpu: str, memory: str) -> None:
    """Build a lab: bridge, hosts h1..hN, etcd, registry, image, master(s), agents."""
    from sigmad.lab import Lab, LabConfig, LabError
    from sigmad.lab.config import (
        parse_cpu_option,
        parse_memory_option,
        parse_port_range,
        parse_ssd_size,
    )
    from sigmad.lab.report import summary

    def up() -> None:
        config = LabConfig(hosts=hosts, name=name, dir=directory, subnet=subnet,
                           overlay_cidr=overlay_cidr, etcd_port=etcd_port,
                           registry_port=registry_port, listen=listen, masters=masters,
                           heartbeat_ttl=heartbeat_ttl, port_range=parse_port_range(port_range),
                           tls=tls, ssds=ssds, ssd_size=parse_ssd_size(ssd_size),
                           cpu=parse_cpu_option(cpu), memory=parse_memory_option(memory))
        the_lab = Lab(config, out=click.echo)
        fresh = the_lab.state is None  # else `up` refuses: the lab exists
        try:
            the_lab.up()
        except (Exception, KeyboardInterrupt) as exc:
            why = str(exc) if isinstance(exc, LabError) else \
                "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc!r}"
            if not fresh or the_lab.state is None:  # nothing was made
                raise LabError(why) from None
            raise LabError(f"{why}\nthe lab is half built; its logs are in "
                           f"{config.root}. Remove it with: sigmad lab down --name {name}"
                           + (f" --dir {directory}" if directory else "")) from None
        click.echo(summary(the_lab, the_lab.state.credentials if the_lab.state else ""))

    _lab_call(up)


@lab.command("status")
@_lab_options
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def lab_status(name: str, directory: Path | None, output: str) -> None:
    """Hosts (engine answers? agent running? up/killed/partitioned), etcd, registry, master."""
    from sigmad.lab.report import status_table

    def status() -> None:
        report = _open_lab(name, directory).status()
        click.echo(json.dumps(report, indent=2) if output == "json" else status_table(report))

    _lab_call(status)


@lab.command("kill-host")
@click.argument("host")
@_lab_options
def lab_kill_host(host: str, name: str, directory: Path | None) -> None:
    """Power loss of HOST: SIGKILL its agent, dockerd, containerd, shims and containers."""
    _lab_call(lambda: _open_lab(name, directory).kill_host(host))


@lab.command("partition")
@click.argument("host")
@_lab_options
def lab_partition(host: str, name: str, directory: Path | None) -> None:
    """Cut HOST's underlay link."""
    _lab_call(lambda: _open_lab(name, directory).partition(host))


@lab.command("heal")
@click.argument("host")
@_lab_options
def lab_heal(host: str, name: str, directory: Path | None) -> None:
    """Undo partition / kill-host of HOST (restarts its dockerd and agent after a kill)."""
    if not _lab_call(lambda: _open_lab(name, directory).heal(host)):
        click.echo(f"{host} is healthy: nothing to heal")


@lab.command("restart-agent")
@click.argument("host")
@_lab_options
def lab_restart_agent(host: str, name: str, directory: Path | None) -> None:
    """Restart HOST's node agent (its overlay set-up is idempotent: traffic keeps flowing)."""
    _lab_call(lambda: _open_lab(name, directory).restart_agent(host))


@lab.command("down")
@_lab_options
def lab_down(name: str, directory: Path | None) -> None:
    """Remove everything `up` made (also of a half-built lab)."""
    from sigmad.lab.state import resolve_dir

    if not _lab_call(lambda: _open_lab(name, directory).down()):
        click.echo(f"there is no lab named {name} ({resolve_dir(name, directory)}): "
                   "nothing to do")


@lab.command("hollow")
@click.option("--hosts", default=100, show_default=True, type=int, help="hollow hosts h1..hN")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True,
              help="where the engines' sockets (hI.sock) and control.sock go")
@click.option("--etcd", "etcd_url", default="http://127.0.0.1:2379", show_default=True,
              help="etcd endpoint(s), comma-separated")
@click.option("--prefix", default="/sigma/v1", show_default=True, help="etcd key prefix")
@click.option("--ttl", default=10, show_default=True, type=int, help="heartbeat TTL (s)")
@click.option("--latency", default="0ms", show_default=True,
              help="added to each create/start/stop/kill/remove (e.g. 5ms)")
@click.option("--cpu", default="8", show_default=True, help="cores per host")
@click.option("--memory", default="32Gi", show_default=True, help="memory per host")
@click.option("--labels", default="", help="labels of every host: k=v,k2=v2 (plus host=hI)")
@click.option("--zones", default=0, show_default=True, type=int,
              help="label zone=zN, hosts round-robin over N zones (0: none)")
@click.option("--image", "images", multiple=True, default=["sigma/busybox:latest"],
              show_default=True, help="images every engine has already pulled (repeatable)")
@click.option("--strict-pulls", is_flag=True,
              help="pulls of other images fail with manifest unknown (default: they succeed)")
@click.option("--overlay-cidr", default="10.244.0.0/16", show_default=True,
              help="the subnet of each engine's sigma network (the master's overlay_cidr)")
def lab_hollow(hosts: int, directory: Path, etcd_url: str, prefix: str, ttl: int,
               latency: str, cpu: str, memory: str, labels: str, zones: int,
               images: tuple[str, ...], strict_pulls: bool, overlay_cidr: str) -> None:
    """N hollow hosts in one process: a fake Docker engine (in memory) and a real node agent
    each, for scale runs; a control socket kills, freezes and heals hosts."""
    from sigmad.lab.hollow_hosts import HollowConfig, run_hollow
    from sigmad.units import parse_cpu, parse_size

    def parse_labels(text: str) -> dict[str, str]:
        pairs = [p.partition("=") for p in text.split(",") if p.strip()]
        if any(not k or not eq for k, eq, _ in pairs):
            raise click.BadParameter("must be k=v,k2=v2", param_hint="--labels")
        return {k.strip(): v.strip() for k, _, v in pairs}

    ms = latency.strip().lower()
    try:
        seconds = float(ms[:-2]) / 1000 if ms.endswith("ms") else float(ms.rstrip("s"))
        config = HollowConfig(
            hosts=hosts, dir=directory.absolute(), etcd=etcd_url.split(","), prefix=prefix,
            ttl=ttl, latency=seconds, cpu=max(parse_cpu(cpu) // 1000, 1),
            memory=parse_size(memory), labels=parse_labels(labels), zones=zones,
            images=images, pull_any=not strict_pulls, overlay_cidr=overlay_cidr,
        )
    except (ValueError, SigmaError) as exc:
        raise click.ClickException(str(getattr(exc, "message", exc))) from None
    _run(run_hollow(config, click.echo))


def main() -> None:
    cli()
