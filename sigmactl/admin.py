"""`sigmactl token`, `sigmactl audit`, `sigmactl backup` (admin tokens) and `sigmactl config`
(the contexts of the credentials file, sigmactl.contexts)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from sigmactl import contexts
from sigmactl.base import Settings, emit, items, obj, output_option
from sigmactl.client import CtlError, api_path
from sigmactl.output import age, table
from sigmad import backup as backup_file
from sigmad.errors import SigmaError


@click.group()
def token() -> None:
    """Create, list and revoke API tokens (admin only)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "operator", "reader"]), required=True,
              help="admin: everything; operator: changes in its namespaces, reads all; "
                   "reader: reads only.")
@click.option("-n", "--namespace", "namespaces", multiple=True,
              help="A namespace an operator may change (repeat for several).")
@output_option("json", "yaml")
@click.pass_obj
def token_create(settings: Settings, name: str, role: str, namespaces: tuple[str, ...],
                 fmt: str | None) -> None:
    """Create a token NAME; its secret is printed once, here, and never again."""
    body: dict[str, Any] = {"name": name, "role": role}
    if namespaces:
        body["namespaces"] = list(namespaces)
    made = obj(settings.client().post_json(api_path("tokens"), body), "a token")
    if fmt:
        emit(made, fmt)
        return
    scope = f" of {', '.join(made.get('namespaces') or [])}" if made.get("namespaces") else ""
    click.echo(f"token {made.get('name')} ({made.get('id')}, {made.get('role')}{scope}) "
               "created; it is shown only this once:", err=True)
    click.echo(str(made.get("token")))


@token.command("list")
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def token_list(settings: Settings, fmt: str) -> None:
    """Every token (never their secrets), revoked ones included."""
    found = items(settings.client().get(api_path("tokens")))
    if fmt != "table":
        emit(found, fmt)
        return
    if not found:
        click.echo("No tokens (the masters' config token is the only one).", err=True)
        return
    now = time.time()
    click.echo(table(["id", "name", "role", "namespaces", "age", "revoked"], [
        [str(t.get("id", "")), str(t.get("name", "")), str(t.get("role", "")),
         ",".join(t.get("namespaces") or []), age(t.get("created"), now),
         f"{age(t.get('revoked'), now)} ago" if t.get("revoked") else ""]
        for t in found]))


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@click.pass_obj
def token_revoke(settings: Settings, token_id: str) -> None:
    """Revoke the token ID for good (every master refuses it from then on)."""
    done = obj(settings.client().delete(api_path("tokens", token_id)), "a token")
    click.echo(f"token {done.get('name')} ({token_id}) revoked")


@click.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="How many of the newest entries.")
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def audit(settings: Settings, limit: int, fmt: str) -> None:
    """The newest entries of the audit log (every change made through the API; admin only)."""
    found = items(settings.client().get(api_path("audit"), {"limit": str(limit)}))
    if fmt != "table":
        emit(found, fmt)
        return
    if not found:
        click.echo("No audit entries.", err=True)
        return
    click.echo(table(["time", "token", "role", "method", "path", "status", "apps"], [
        [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0))),
         f"{e.get('name')} ({e.get('token')})", str(e.get("role", "")),
         str(e.get("method", "")), str(e.get("path", "")), str(e.get("status", "")),
         ",".join(e.get("apps") or [])]
        for e in found]))


# -- contexts ----------------------------------------------------------------------------------


@click.group()
def config() -> None:
    """Configs of the config center (create, apply, get, describe, history, diff, edit,
    rollback, delete), and the contexts of the credentials file: one per cluster, each with
    every master's URL and a token ($SIGMA_CREDENTIALS, default
    ~/.sigma/credentials.json)."""


def _load() -> contexts.Credentials:
    try:
        return contexts.load()
    except contexts.CredentialsError as exc:
        raise CtlError(str(exc)) from None


@config.command("get-contexts")
@output_option("table", "json", "yaml", default="table")
def get_contexts(fmt: str) -> None:
    """Every context; the current one is marked with *."""
    creds = _load()
    if fmt != "table":
        emit([{"name": n, "current": n == creds.current, "servers": c.servers}
              for n, c in creds.contexts.items()], fmt)
        return
    if not creds.contexts:
        click.echo(f"No contexts in {contexts.credentials_path()}: run 'sigmad dev', "
                   "'sigmad lab up' or 'sigmactl config set-context'.", err=True)
        return
    click.echo(table(["current", "name", "servers"], [
        ["*" if n == creds.current else " ", n, ",".join(c.servers)]
        for n, c in sorted(creds.contexts.items())]))


@config.command("current-context")
def current_context() -> None:
    """The name of the current context."""
    creds = _load()
    if not creds.current:
        raise CtlError(f"no current context in {contexts.credentials_path()}: "
                       "see 'sigmactl config get-contexts'")
    click.echo(creds.current)


@config.command("use-context")
@click.argument("name")
def use_context(name: str) -> None:
    """Make NAME the current context."""
    creds = _load()
    if name not in creds.contexts:
        known = ", ".join(sorted(creds.contexts)) or "none"
        raise CtlError(f"no context {name!r} (contexts: {known}): see "
                       "'sigmactl config get-contexts'")
    creds.current = name
    _save(creds)
    click.echo(f"switched to context {name}")


@config.command("set-context")
@click.argument("name")
@click.option("--server", "servers", metavar="URL[,URL]", required=True,
              help="Every master's URL, comma-separated, in the order to try them.")
@click.option("--token", "token_", metavar="TOKEN", required=True, help="The API token.")
@click.option("--ca", default="", metavar="FILE",
              help="The cluster's CA certificate, to verify https:// masters.")
@click.option("--use", is_flag=True, help="Make it the current context.")
def set_context(name: str, servers: str, token_: str, ca: str, use: bool) -> None:
    """Add or replace the context NAME."""
    creds = _load()
    creds.contexts[name] = contexts.Context(contexts.split_servers(servers), token_, ca)
    if use or not creds.current:
        creds.current = name
    _save(creds)
    click.echo(f"context {name} set" + (" (current)" if creds.current == name else ""))


def _save(creds: contexts.Credentials) -> None:
    try:
        contexts.save(creds)
    except contexts.CredentialsError as exc:
        raise CtlError(str(exc)) from None


@click.command()
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False,
              path_type=Path), help="The file to write (mode 0600: it holds token hashes).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def backup(settings: Settings, out: Path, as_json: bool) -> None:
    """Back up the cluster's state (admin only): every key under its etcd prefix, read at one
    revision. Restore it with `sigmad restore FILE` (see docs/operations.md)."""
    show = sys.stderr.isatty() and not as_json
    received = 0
    chunks = []
    for chunk in settings.client().text(api_path("backup")):
        chunks.append(chunk)
        received += len(chunk)
        if show:
            click.echo(f"\rreceived {received / (1 << 20):.1f} MiB", nl=False, err=True)
    if show:
        click.echo(err=True)
    data = b"".join(chunks)
    try:
        taken = backup_file.decode(data)
    except SigmaError as exc:
        raise CtlError(f"the master's answer is no backup ({exc.message}): is --server a "
                       "Sigma master of this version?") from None
    tmp = out.with_name(f".{out.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    summary = {"file": str(out), "revision": taken.revision, "prefix": taken.prefix,
               "keys": len(taken.entries), "leased": taken.leased, "bytes": len(data)}
    if as_json:
        emit(summary, "json")
        return
    click.echo(table(["file", "revision", "prefix", "keys", "leased (not restored)", "size"],
                     [[str(out), str(taken.revision), taken.prefix, str(len(taken.entries)),
                       str(taken.leased), f"{len(data) / 1024:.1f} KiB"]]))
