"""`sigmactl`: apply, get, describe and delete Sigma objects over the HTTP API."""

from __future__ import annotations

import time
from typing import IO, Any

import click

from sigmactl import admin, commands, observe, output, rollout, waits
from sigmactl import configs as _configs  # noqa: F401 (adds the config center to `config`)
from sigmactl.base import Settings, emit, items, namespace_option
from sigmactl.client import CtlError, api_path
from sigmad import __version__

KINDS = {
    "node": "nodes", "nodes": "nodes",
    "app": "apps", "apps": "apps",
    "instance": "instances", "instances": "instances",
    "master": "masters", "masters": "masters",
    "ssd": "ssds", "ssds": "ssds",
}
UNSCOPED = ("nodes", "masters", "ssds")  # kinds without namespace or app


class Group(click.Group):
    """A click group that reports CtlError as `error: MESSAGE` and exits 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtlError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", metavar="URL[,URL]", help="Sigma master URLs, comma-separated: "
              "the first that answers is used [env: SIGMA_SERVER].")
@click.option("--token", metavar="TOKEN", help="API bearer token [env: SIGMA_TOKEN].")
@click.option("--context", metavar="NAME", help="Context of the credentials file to use "
              "instead of its current one [env: SIGMA_CONTEXT].")
@click.version_option(__version__, prog_name="sigmactl")
@click.pass_context
def cli(ctx: click.Context, server: str | None, token: str | None,
        context: str | None) -> None:
    """Control a Sigma cluster. Without --server/--token, SIGMA_SERVER/SIGMA_TOKEN or the
    current context of the credentials file $SIGMA_CREDENTIALS (default
    ~/.sigma/credentials.json; see 'sigmactl config') are used."""
    ctx.obj = Settings(server, token, context)


@cli.command()
@click.option("-f", "--filename", "file", type=click.File("r", encoding="utf-8"),
              required=True, help="YAML or JSON app specs; '-' reads stdin.")
@click.option("--dry-run", is_flag=True, help="Validate and report, write nothing.")
@click.option("--wait", is_flag=True, help="Then wait until every replica of each app runs as "
              "specified (template, caps, requests).")
@click.option("--timeout", type=click.FloatRange(min=0), default=300, show_default=True,
              help="Seconds to wait with --wait.")
@click.pass_obj
def apply(settings: Settings, file: IO[str], dry_run: bool, wait: bool,
          timeout: float) -> None:
    """Create or update the apps in FILE."""
    params = {"dry_run": "true"} if dry_run else None
    client = settings.client()
    answer = client.put_text(api_path("apps"), file.read(), params)
    suffix = " (dry run)" if dry_run else ""
    for item in items(answer):
        click.echo(f"app {item['app']} {item['action']} "
                   f"(generation {item['generation']}){suffix}")
    if wait and not dry_run:
        for item in items(answer):
            namespace, name = str(item["app"]).split("/", 1)
            if item["action"] == "updated":
                ended = rollout.follow(client, namespace, name, timeout)
                said = f"app {item['app']}: " + rollout.ended_text({**ended, "app": name})
                if rollout.failed(ended):
                    raise CtlError(said)
                if (ended.get("rollout") or {}).get("phase") in ("canary", "paused"):
                    click.echo(said)
                    continue
            count = waits.until_settled(client, namespace, name, timeout)
            click.echo(f"app {item['app']}: {output.plural(count, 'replica')} running as "
                       "specified")


@cli.command()
@click.argument("kind", type=click.Choice(sorted(KINDS), case_sensitive=False))
@click.option("-n", "--namespace", help="Only this namespace (default: all).")
@click.option("--app", help="Only this app.")
@click.option("-o", "--output", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "wide", "json", "yaml"]))
@click.pass_obj
def get(settings: Settings, kind: str, namespace: str | None, app: str | None,
        fmt: str) -> None:
    """List nodes, apps, instances, masters (the leader and the standbys) or SSDs."""
    kind = KINDS[kind.lower()]
    if kind in UNSCOPED and (namespace or app):
        raise click.UsageError(f"{kind} have no namespace or app: drop -n/--app")
    params = {k: v for k, v in (("namespace", namespace), ("app", app)) if v}
    if kind == "apps":
        params.pop("app", None)
    found = items(settings.client().get(api_path(kind), params))
    if kind == "apps" and app:
        found = [a for a in found if a.get("app") == app]
    if fmt in ("json", "yaml"):
        emit(found, fmt)
    elif not found:
        click.echo("No resources found.", err=True)
    else:
        click.echo(output.list_table(kind, found, fmt == "wide", time.time()))


@cli.command()
@click.argument("kind", type=click.Choice(["app", "instance", "ssd"], case_sensitive=False))
@click.argument("name")
@namespace_option
@click.option("-o", "--output", "fmt", type=click.Choice(["json", "yaml"]),
              help="Print the raw object instead of a description.")
@click.pass_obj
def describe(settings: Settings, kind: str, name: str, namespace: str,
             fmt: str | None) -> None:
    """Show one app, one instance (NAME is APP-INDEX) or one SSD (NAME is NODE/ID) in
    detail."""
    kind = kind.lower()
    if kind == "ssd":
        found = [d for d in items(settings.client().get(api_path("ssds")))
                 if f"{d.get('node')}/{d.get('id')}" == name]
        if not found:
            raise CtlError(f"ssd {name} not found: see 'sigmactl get ssds' (NAME is NODE/ID)")
        if fmt:
            emit(found[0], fmt)
        else:
            click.echo(output.describe_ssd(found[0], time.time()))
        return
    answer = settings.client().get(api_path(KINDS[kind], namespace, name))
    if fmt:
        emit(answer, fmt)
    elif kind == "app":
        click.echo(output.describe_app(answer, time.time()))
    else:
        click.echo(output.describe_instance(answer, time.time()))


@cli.command()
@click.argument("kind", type=click.Choice(["app"], case_sensitive=False))
@click.argument("name")
@namespace_option
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the app's instances are gone.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True,
              help="Seconds to wait.")
@click.pass_obj
def delete(settings: Settings, kind: str, name: str, namespace: str, wait: bool,
           timeout: float) -> None:
    """Delete an app; its instances are then stopped and removed."""
    client = settings.client()
    client.delete(api_path("apps", namespace, name))
    click.echo(f"app {namespace}/{name} deleted")
    if wait:
        waits.until_gone(client, namespace, name, timeout)


for command in (observe.logs, observe.top, observe.exec_, observe.completion,
                commands.update, commands.events, commands.pool, commands.why,
                commands.migrate, commands.drain, commands.uncordon, commands.ssd, admin.token,
                admin.audit, admin.backup, admin.config, rollout.rollout, rollout.release):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="sigmactl")
