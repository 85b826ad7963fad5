"""`sigmactl logs`, `top nodes|instances`, `exec` (`-it`: sigmactl.terminal) and
`completion`, with the shell completion of app, instance and node names."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click
from click.shell_completion import CompletionItem

from sigmactl.base import Settings, emit, items, namespace_option, obj, output_option
from sigmactl.client import CtlError, api_path
from sigmactl.output import NONE, Item, table
from sigmad.units import format_cpu, format_size

COMPLETION_TIMEOUT = 2.0  # seconds a completion waits for the master


def _cpu(value: int | None) -> str:
    return NONE if value is None else format_cpu(value)


def _size(value: int | None) -> str:
    return NONE if value is None else format_size(value)


def top_nodes_table(nodes: Sequence[Item]) -> str:
    """Per node: used (its agent's latest sample) next to requested and allocatable."""
    rows = []
    for n in nodes:
        used, req, alloc = (n.get(k) or {} for k in ("used", "requested", "allocatable"))
        rows.append([n.get("name", ""), n.get("status", ""),
                     _cpu(used.get("cpu_m")), _cpu(req.get("cpu_m")), _cpu(alloc.get("cpu_m")),
                     _size(used.get("memory")), _size(req.get("memory")),
                     _size(alloc.get("memory")), n.get("used_scope") or NONE])
    return table(["NAME", "STATUS", "CPU(USED)", "CPU(REQ)", "CPU(ALLOC)", "MEM(USED)",
                  "MEM(REQ)", "MEM(ALLOC)", "MEASURED"], rows)


def app_limits(apps: Sequence[Item]) -> dict[str, tuple[int, int]]:
    """`ns/app` → the summed cpu (millicores) and memory limits of its containers."""
    out = {}
    for a in apps:
        containers = (a.get("spec") or {}).get("containers") or []
        limits = [(c.get("resources") or {}).get("limit") or {} for c in containers]
        out[f"{a.get('namespace')}/{a.get('app')}"] = (
            sum(int(x.get("cpu_m") or 0) for x in limits),
            sum(int(x.get("memory") or 0) for x in limits))
    return out


def top_instances_table(instances: Sequence[Item], samples: Sequence[Item],
                        apps: Sequence[Item]) -> str:
    """Per placed instance: used (its node's latest sample) next to its request and its
    app's limits (0: no cap); disk is bytes used on its SSDs."""
    used: dict[str, Item] = {}
    for s in samples:
        used.update(s.get("instances") or {})
    limits = app_limits(apps)
    rows = []
    for i in instances:
        key = f"{i.get('namespace')}/{i.get('name')}"
        u = used.get(key) or {}
        req = i.get("request") or {}
        cpu_limit, memory_limit = limits.get(f"{i.get('namespace')}/{i.get('app')}", (0, 0))
        rows.append([key, i.get("node") or NONE,
                     _cpu(round(u["cpu"] * 1000)) if "cpu" in u else NONE,
                     _cpu(req.get("cpu_m", 0)), _cpu(cpu_limit),
                     _size(u.get("memory")), _size(req.get("memory", 0)), _size(memory_limit),
                     _size(u.get("disk")) if u.get("disk") else NONE])
    return table(["INSTANCE", "NODE", "CPU(USED)", "CPU(REQ)", "CPU(LIMIT)", "MEM(USED)",
                  "MEM(REQ)", "MEM(LIMIT)", "DISK(USED)"], rows)


# -- completion of names (a shell asks while the user types: never an error, never slow) ----


def _names(ctx: click.Context, path: str, key: str, params: dict[str, str] | None = None
           ) -> list[str]:
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        settings = Settings(None, None)
    try:
        client = settings.client()
        client.timeout = COMPLETION_TIMEOUT
        client.say = lambda _: None
        return [str(i.get(key, "")) for i in items(client.get(path, params))]
    except (CtlError, OSError):
        return []


def _namespace(ctx: click.Context) -> str:
    return str(ctx.params.get("namespace") or "default")


def complete_instance(ctx: click.Context, param: click.Parameter, incomplete: str
                      ) -> list[CompletionItem]:
    names = _names(ctx, api_path("instances"), "name", {"namespace": _namespace(ctx)})
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_app(ctx: click.Context, param: click.Parameter, incomplete: str
                 ) -> list[CompletionItem]:
    names = _names(ctx, api_path("apps"), "app", {"namespace": _namespace(ctx)})
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_node(ctx: click.Context, param: click.Parameter, incomplete: str
                  ) -> list[CompletionItem]:
    return [CompletionItem(n) for n in _names(ctx, api_path("nodes"), "name")
            if n.startswith(incomplete)]


# -- commands ------------------------------------------------------------------------------


@click.command()
@click.argument("instance", shell_complete=complete_instance)
@namespace_option
@click.option("-c", "--container", default="", help="The container (default: the first).")
@click.option("-f", "--follow", is_flag=True, help="Then print what it writes, until Ctrl-C.")
@click.option("--tail", type=click.IntRange(0, 10_000), default=100, show_default=True,
              help="Lines from the end to print first.")
@click.option("-p", "--previous", is_flag=True, help="The last lines of its last ended "
              "container, kept with its termination (the container may be gone).")
@click.pass_obj
def logs(settings: Settings, instance: str, namespace: str, container: str, follow: bool,
         tail: int, previous: bool) -> None:
    """Print the output of INSTANCE's container (APP-INDEX), through its node's engine."""
    if follow and previous:
        raise click.UsageError("--previous lines cannot be followed: drop -f or --previous")
    params = {"tail": str(tail)}
    if container:
        params["container"] = container
    if follow:
        params["follow"] = "1"
    if previous:
        params["previous"] = "1"
    out = sys.stdout.buffer
    try:
        for chunk in settings.client().text(api_path("instances", namespace, instance,
                                                     "logs"), params):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass


@click.group()
def top() -> None:
    """What nodes and instances use now (their agents' latest samples), next to what they
    request, their limits and what is allocatable."""


@top.command("nodes")
@output_option("json", "yaml")
@click.pass_obj
def top_nodes(settings: Settings, fmt: str | None) -> None:
    """Per node: cpu and memory used, requested, allocatable, and what was measured
    (machine: the whole machine; cgroup:PARENT: only its engine's containers)."""
    nodes = items(settings.client().get(api_path("nodes")))
    if fmt:
        emit([{k: n.get(k) for k in ("name", "status", "used", "used_scope", "requested",
                                     "allocatable")} for n in nodes], fmt)
    else:
        click.echo(top_nodes_table(nodes))


@top.command("instances")
@click.option("-n", "--namespace", help="Only this namespace (default: all).")
@click.option("--app", help="Only this app.")
@output_option("json", "yaml")
@click.pass_obj
def top_instances(settings: Settings, namespace: str | None, app: str | None,
                  fmt: str | None) -> None:
    """Per instance: cpu and memory used (0 cpu at a container's first sample), its request,
    its app's limits, and bytes used on its SSDs."""
    client = settings.client()
    params = {k: v for k, v in (("namespace", namespace), ("app", app)) if v}
    found = [i for i in items(client.get(api_path("instances"), params)) if i.get("node")]
    samples = items(client.get(api_path("usage")))
    if fmt:
        used: dict[str, Any] = {}
        for s in samples:
            used.update(s.get("instances") or {})
        emit({k: used[k] for k in (f"{i['namespace']}/{i['name']}" for i in found)
              if k in used}, fmt)
        return
    click.echo(top_instances_table(found, samples, items(client.get(api_path("apps"),
                                                                    {**params}))))


@click.command("exec")
@click.argument("instance", shell_complete=complete_instance)
@click.argument("command", nargs=-1, required=True)
@namespace_option
@click.option("-c", "--container", default="", help="The container (default: the first).")
@click.option("-i", "--stdin", is_flag=True, help="Keep stdin open to the command (with -t).")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal (with -i): "
              "-it for a shell.")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=30, show_default=True,
              help="Seconds the command may run (without -it).")
@click.pass_obj
def exec_(settings: Settings, instance: str, command: tuple[str, ...], namespace: str,
          container: str, stdin: bool, tty: bool, timeout: float) -> None:
    """Run COMMAND in INSTANCE's container and print its output (sigmactl exec web-0 --
    ls /), or with -it on this terminal (sigmactl exec -it web-0 -- sh); exits with its
    exit code."""
    if stdin != tty:
        raise click.UsageError("-i and -t go together: -it for a terminal on the command, "
                               "neither to run it and print its output")
    body: dict[str, Any] = {"command": list(command)}
    if container:
        body["container"] = container
    if tty:
        from sigmactl import terminal  # (aiohttp: imported by this command only)

        terminal.need_terminal(0)
        client = settings.client()
        made = obj(client.post_json(api_path("instances", namespace, instance, "exec"),
                                    {**body, "stdin": True, "tty": True}), "an exec session")
        sys.exit(terminal.run(client, str(made.get("path", ""))))
    body["timeout"] = timeout
    answer = obj(settings.client().post_json(api_path("instances", namespace, instance,
                                                      "exec"), body), "an exec result")
    sys.stdout.write(str(answer.get("output", "")))
    sys.stdout.flush()
    code = int(answer.get("exit_code") or 0)
    if code:
        sys.exit(code)


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script of SHELL (commands, options, and app, instance and node
    names from the cluster): e.g. `source <(sigmactl completion bash)`."""
    from click.shell_completion import get_completion_class

    from sigmactl.cli import cli

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "sigmactl", "_SIGMACTL_COMPLETE").source())
