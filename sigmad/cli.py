"""`sigmad master | node | dev`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from sigmad import __version__
from sigmad.config import DEFAULT_ENGINE, DEFAULT_LISTEN, load_master, load_node
from sigmad.errors import SigmaError


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
def cli(log_level: str) -> None:
    """Sigma daemon: one pool of hosts used as one big server."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _load(loader: Any, path: str) -> Any:
    try:
        return loader(path)
    except SigmaError as exc:
        raise click.ClickException(f"{path}: {exc.message}") from None


@cli.command()
@click.option("--config", "config_path", default="/etc/sigma/master.yaml", show_default=True)
def master(config_path: str) -> None:
    """Run the master: API, controller and scheduler."""
    from sigmad.master import run_master

    _run(run_master(_load(load_master, config_path)))


@cli.command()
@click.option("--config", "config_path", default="/etc/sigma/node.yaml", show_default=True)
def node(config_path: str) -> None:
    """Run the node agent of this host."""
    from sigmad.node.agent import run_agent

    _run(run_agent(_load(load_node, config_path)))


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


def main() -> None:
    cli()
