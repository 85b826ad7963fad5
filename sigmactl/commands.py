"""`sigmactl update`, `events`, `pool` and `why`."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from sigmactl import views, waits
from sigmactl.base import Settings, emit, items, namespace_option, obj, output_option
from sigmactl.client import CtlError, api_path
from sigmactl.observe import complete_app, complete_instance, complete_node
from sigmactl.output import plural
from sigmad.units import parse_cpu, parse_size

QUANTITY_OPTIONS = "--limit-cpu, --limit-memory, --request-cpu or --request-memory"


def _checked(parse: Callable[[str], int]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that refuses a quantity the server would refuse; keeps the text."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                parse(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return check


def _quantity_option(name: str, parse: Callable[[str], int], what: str) -> Any:
    return click.option(name, metavar="Q", callback=_checked(parse), help=f"{what}.")


@click.command()
@click.argument("app", shell_complete=complete_app)
@namespace_option
@click.option("--container", metavar="NAME", help="The container to change (needed when the "
              "app has several).")
@_quantity_option("--limit-cpu", parse_cpu, "CPU cap, e.g. 500m, 2, 0.5")
@_quantity_option("--limit-memory", parse_size, "Memory cap (swap off), e.g. 512Mi, 8Gi")
@_quantity_option("--request-cpu", parse_cpu, "CPU share booked on the node, e.g. 250m, 1")
@_quantity_option("--request-memory", parse_size, "Memory booked on the node, e.g. 2Gi")
@click.option("--force", is_flag=True, help="Lower the memory limit even below what the "
              "containers use now (the kernel may then OOM-kill them).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every running container has the new caps (and every "
              "instance its new request).")
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True,
              help="Seconds to wait.")
@output_option("json")
@click.pass_obj
def update(settings: Settings, app: str, namespace: str, container: str | None,
           limit_cpu: str | None, limit_memory: str | None, request_cpu: str | None,
           request_memory: str | None, force: bool, wait: bool, timeout: float,
           fmt: str | None) -> None:
    """Resize APP's running containers in place.

    Changes cpu/memory limits and requests on the same containers, without a restart (a cap
    may also appear, or be lifted with 0). A request that no longer fits its node is
    refused, and then nothing is changed."""
    given = {"limit": {"cpu": limit_cpu, "memory": limit_memory},
             "request": {"cpu": request_cpu, "memory": request_memory}}
    body: dict[str, Any] = {part: {k: v for k, v in values.items() if v is not None}
                            for part, values in given.items()}
    body = {part: values for part, values in body.items() if values}
    if not body:
        raise click.UsageError(f"nothing to change: give {QUANTITY_OPTIONS}")
    if container:
        body["container"] = container
    if force:
        body["force"] = True
    client = settings.client()
    answer = obj(client.post_json(api_path("apps", namespace, app, "resources"), body),
                 "a resize result")
    if wait and answer.get("action") != "unchanged":
        waits.until_settled(client, namespace, app, timeout)
    if fmt:
        emit(answer, fmt)
        return
    name = answer.get("app") or f"{namespace}/{app}"
    if answer.get("action") == "unchanged":
        click.echo(f"app {name} unchanged")
    else:
        count = plural(int(answer.get("containers") or 0), "container")
        click.echo(f"app {name} {answer.get('action')} "
                   f"(generation {answer.get('generation')}, {count} updated)")


@contextlib.contextmanager
def _until_interrupted() -> Iterator[None]:
    """Run the block until SIGINT (Ctrl-C), which ends it quietly. SIGINT is taken even if
    this process started with it ignored, as a non-interactive shell starts a background
    job: Python leaves an ignored SIGINT ignored, and the block could then only be killed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)


@click.command()
@click.option("-w", "--watch", is_flag=True, help="After the recent events, print each new "
              "one as it happens, until Ctrl-C.")
@click.option("-n", "--namespace", help="Only this namespace (default: all).")
@click.option("--app", help="Only this app.")
@click.option("--kind", type=click.Choice(["instance", "node"]), help="Only this kind.")
@click.option("--limit", type=click.IntRange(min=0, max=1000), metavar="N",
              help="At most N recent events, the newest (the server's default is 100).")
@click.option("--since", type=click.IntRange(min=0), metavar="REVISION",
              help="Only events written after this etcd revision (GET /v1/events says "
                   "which revision each answer was read at).")
@output_option("table", "json", default="table")
@click.pass_obj
def events(settings: Settings, watch: bool, namespace: str | None, app: str | None,
           kind: str | None, limit: int | None, since: int | None, fmt: str) -> None:
    """Show recent events, or watch them (-w).

    Instance state changes with their reasons and node changes: the newest, oldest first.
    -o json prints one JSON object per line."""
    params = {k: str(v) for k, v in (("namespace", namespace), ("app", app), ("kind", kind),
                                     ("limit", limit), ("since", since))
              if v not in (None, "")}
    client = settings.client()

    def show(event: Any) -> str:
        event = obj(event, "an event")
        return views.event_json(event) if fmt == "json" else views.event_line(
            views.event_cells(event))

    if not watch:
        answer = client.get(api_path("events"), params)
        found = [obj(e, "an event") for e in items(answer)]
        if not found:
            click.echo("No events found.", err=True)
        elif fmt == "table":
            click.echo(views.events_table(found))
        else:
            click.echo("\n".join(show(e) for e in found))
        if isinstance(answer, dict) and answer.get("more") and found:
            click.echo(f"(older events not shown: --limit up to 1000, or filter by "
                       f"--namespace/--app; revision {answer.get('revision')})", err=True)
        return
    with _until_interrupted(), \
            contextlib.closing(client.events(api_path("events"), {**params, "watch": "true"})) \
            as stream:
        for n, event in enumerate(stream):
            if n == 0 and fmt == "table":
                click.echo(views.event_line(views.EVENT_HEADERS))
            click.echo(show(event))
        raise CtlError("the server closed the event stream: run 'sigmactl events -w' again "
                       "to go on watching")


@click.command()
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def pool(settings: Settings, fmt: str) -> None:
    """Show the pool of Ready nodes as one server.

    Allocatable, requested, free and the limits committed (the overcommit in use), overall
    and per node label value."""
    answer = obj(settings.client().get(api_path("pool")), "a pool summary")
    if fmt == "table":
        click.echo(views.pool_text(answer))
    else:
        emit(answer, fmt)


@click.command()
@click.argument("instance", shell_complete=complete_instance)
@namespace_option
@output_option("json")
@click.pass_obj
def why(settings: Settings, instance: str, namespace: str, fmt: str | None) -> None:
    """Say why INSTANCE (APP-INDEX) is in its state.

    For a Pending one, how many nodes each scheduler filter rejected; for a starting one,
    which containers are not ready yet."""
    answer = obj(settings.client().get(api_path("instances", namespace, instance)),
                 "an instance")
    if fmt:
        emit(views.why_data(answer), fmt)
    else:
        click.echo(views.why_text(answer))


@click.command()
@click.argument("instance", shell_complete=complete_instance)
@click.option("--to", "to", default="", shell_complete=complete_node,
              help="The node to move it to (default: any that fits).")
@namespace_option
@output_option("json")
@click.pass_obj
def migrate(settings: Settings, instance: str, to: str, namespace: str,
            fmt: str | None) -> None:
    """Move INSTANCE (APP-INDEX), NeedMigration because its node is lost, to a node that fits
    (or to --to NODE). It keeps its name, overlay IP and request."""
    answer = obj(settings.client().post_json(api_path("instances", namespace, instance, "migrate"),
                                        {"to": to}), "an instance")
    if fmt:
        emit(answer, fmt)
    else:
        click.echo(f"{answer.get('namespace')}/{instance} is migrating "
                   f"{'to ' + to if to else 'to a node that fits'} (IP {answer.get('ip')}); "
                   f"follow it with 'sigmactl get instances -o wide'")


@click.command()
@click.argument("node", shell_complete=complete_node)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the moves until the node holds no instance.")
@click.option("--timeout", default=600, show_default=True, help="Seconds to wait at most.")
@click.pass_obj
def drain(settings: Settings, node: str, wait: bool, timeout: int) -> None:
    """Move every instance off NODE, one at a time (each new copy ready before the old one
    stops, with the same IP), and keep new ones away (Draining). Undo with uncordon."""
    client = settings.client()
    client.post_json(api_path("nodes", node, "drain"), {})
    click.echo(f"node {node} is Draining: nothing new lands there")
    if not wait:
        return
    deadline, last = time.monotonic() + timeout, None
    while True:
        left = [i for i in items(client.get(api_path("instances"))) if i.get("node") == node]
        if not left:
            click.echo(f"node {node} is drained")
            return
        moving = ", ".join(f"{i['name']} → {i['next_node']}" for i in left if i.get("next_node"))
        line = f"{len(left)} instance(s) left on {node}" + (f"; moving {moving}" if moving else "")
        if line != last:
            click.echo(line)
            last = line
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"{len(left)} instance(s) still on {node} after {timeout}s; see "
                f"'sigmactl get instances -o wide' and 'sigmactl why' for the reason")
        time.sleep(1)


@click.command()
@click.argument("node", shell_complete=complete_node)
@click.pass_obj
def uncordon(settings: Settings, node: str) -> None:
    """Let NODE take new instances again (undoes drain)."""
    settings.client().post_json(api_path("nodes", node, "uncordon"), {})
    click.echo(f"node {node} takes new instances again")


@click.group()
def ssd() -> None:
    """Whole local disks (app spec volumes): see them with 'sigmactl get ssds'."""


def _disk(disk: str) -> tuple[str, str]:
    node, sep, disk_id = disk.partition("/")
    if not sep or not node or not disk_id or "/" in disk_id:
        raise click.UsageError(f"{disk!r}: give NODE/ID as 'sigmactl get ssds' lists it")
    return node, disk_id


@ssd.command("release")
@click.argument("disk", metavar="NODE/ID")
@click.pass_obj
def ssd_release(settings: Settings, disk: str) -> None:
    """Free a retained disk (its instance is gone, or moved when its node was lost): its
    agent wipes it (a fresh filesystem), then others may claim it. Its data is lost."""
    node, disk_id = _disk(disk)
    answer = settings.client().post_json(api_path("ssds", node, disk_id, "release"), {})
    owner = answer.get("released", "") if isinstance(answer, dict) else ""
    click.echo(f"disk {node}/{disk_id} released (it held {owner}'s data); its agent wipes it")


@ssd.command("cordon")
@click.argument("disk", metavar="NODE/ID")
@click.pass_obj
def ssd_cordon(settings: Settings, disk: str) -> None:
    """Keep a free disk out of scheduling (e.g. to replace it); its data is kept."""
    node, disk_id = _disk(disk)
    settings.client().post_json(api_path("ssds", node, disk_id, "cordon"), {})
    click.echo(f"disk {node}/{disk_id} cordoned: nothing is placed on it")


@ssd.command("uncordon")
@click.argument("disk", metavar="NODE/ID")
@click.pass_obj
def ssd_uncordon(settings: Settings, disk: str) -> None:
    """Give a cordoned or broken disk back: its agent formats it afresh (its data is lost),
    then it is ready; a disk still broken is reported broken again."""
    node, disk_id = _disk(disk)
    settings.client().post_json(api_path("ssds", node, disk_id, "uncordon"), {})
    click.echo(f"disk {node}/{disk_id} uncordoned: its agent formats it afresh")
