"""`sigmactl config create|apply|get|describe|history|diff|edit|rollback|delete`: the config
center (sigmad.configs), as subcommands of `sigmactl config` (beside the contexts)."""

from __future__ import annotations

import difflib
import os
import time
from typing import IO, Any

import click
import yaml

from sigmactl.admin import config
from sigmactl.base import Settings, emit, items, namespace_option, obj, output_option
from sigmactl.client import CtlError, api_path
from sigmactl.output import age, fields, table

dry_run_option = click.option("--dry-run", is_flag=True,
                              help="Check, and list the apps and instances it would touch; "
                                   "write nothing.")


def _said(answer: Any, dry_run: bool) -> None:
    """One line (and the instances touched) for a config write's answer."""
    result = obj(answer, "a config result")
    suffix = " (dry run)" if dry_run else ""
    click.echo(f"config {result.get('config')} {result.get('action')} "
               f"(version {result.get('version')}){suffix}")
    apps = result.get("apps") or []
    if apps:
        click.echo(f"  apps following it: {', '.join(apps)}")
    for inst in result.get("instances") or []:
        click.echo(f"  instance {inst} {'would take' if dry_run else 'takes'} "
                   f"version {result.get('version')}")
    if result.get("dropped"):
        click.echo(f"  versions no longer kept: {', '.join(map(str, result['dropped']))}")


def _post(settings: Settings, namespace: str, name: str, body: dict[str, Any],
          dry_run: bool) -> None:
    params = {"dry_run": "true"} if dry_run else None
    _said(settings.client().post_json(api_path("configs", namespace, name), body, params),
          dry_run)


def _read_files(paths: tuple[str, ...]) -> dict[str, str]:
    """File name → text of each `PATH` or `NAME=PATH`."""
    files: dict[str, str] = {}
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(item), item
        try:
            with open(path, encoding="utf-8") as f:
                files[name] = f.read()
        except (OSError, UnicodeError) as exc:
            raise CtlError(f"cannot read {path}: {exc}") from None
    return files


@config.command("create")
@click.argument("name")
@click.option("--from-file", "paths", multiple=True, required=True, metavar="[NAME=]PATH",
              help="A file of the config (repeat; NAME defaults to the file's base name).")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json", "ini", "env"]),
              help="Check every file parses as this format before storing.")
@click.option("-m", "--comment", default="", help="Why (kept in the history).")
@namespace_option
@dry_run_option
@click.pass_obj
def create(settings: Settings, name: str, paths: tuple[str, ...], fmt: str | None,
           comment: str, namespace: str, dry_run: bool) -> None:
    """Create config NAME from files, or add a new version of it."""
    body = {"files": _read_files(paths), "format": fmt or "", "comment": comment}
    _post(settings, namespace, name, body, dry_run)


@config.command("apply")
@click.option("-f", "--filename", "file", type=click.File("r", encoding="utf-8"),
              required=True, help="YAML documents {config, namespace, format, comment, "
                                  "files: {NAME: TEXT}}; '-' reads stdin.")
@dry_run_option
@click.pass_obj
def apply(settings: Settings, file: IO[str], dry_run: bool) -> None:
    """Create configs, or add a version to each that changed (an unchanged one is left as
    it is)."""
    try:
        docs = [d for d in yaml.safe_load_all(file.read()) if d is not None]
    except yaml.YAMLError as exc:
        raise CtlError(f"{file.name}: not valid YAML: {exc}") from None
    for n, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), str):
            raise CtlError(f"{file.name}: document {n} needs `config: NAME` and `files:`")
        body = {k: doc[k] for k in ("files", "format", "comment") if k in doc}
        unknown = sorted(set(doc) - {"config", "namespace", "files", "format", "comment"})
        if unknown:
            raise CtlError(f"{file.name}: document {n}: unknown field {unknown[0]}")
        _post(settings, str(doc.get("namespace") or "default"), doc["config"], body, dry_run)


@config.command("get")
@click.argument("name", required=False)
@click.option("-n", "--namespace", help="Only this namespace (default: all).")
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def get(settings: Settings, name: str | None, namespace: str | None, fmt: str) -> None:
    """List configs (or one: NAME) with their latest version and the apps using them."""
    params = {"namespace": namespace} if namespace else None
    found = items(settings.client().get(api_path("configs"), params))
    if name:
        found = [c for c in found if c.get("name") == name]
    if fmt != "table":
        emit(found, fmt)
        return
    if not found:
        click.echo("No configs found.", err=True)
        return
    now = time.time()
    click.echo(table(["namespace", "name", "latest", "kept", "format", "used by", "age"], [
        [str(c.get("namespace")), str(c.get("name")), str(c.get("latest")),
         str(len(c.get("versions") or [])), c.get("format") or "-",
         ",".join(c.get("used_by") or []) or "-", age(c.get("created"), now)]
        for c in found]))


@config.command("describe")
@click.argument("name")
@namespace_option
@output_option("json", "yaml")
@click.pass_obj
def describe(settings: Settings, name: str, namespace: str, fmt: str | None) -> None:
    """One config: its latest version's files, the apps using it, the version each of
    their instances pins and has, and each app's config rollout (why it failed, if it
    did)."""
    found = obj(settings.client().get(api_path("configs", namespace, name)), "a config")
    if fmt:
        emit(found, fmt)
        return
    latest = found.get("latest_version") or {}
    now = time.time()
    click.echo(fields([
        ("Name", f"{found.get('namespace')}/{found.get('name')}"),
        ("Latest", f"version {found.get('latest')} ({age(latest.get('created'), now)} ago by "
                   f"{latest.get('author') or '?'})"),
        ("Kept", ", ".join(map(str, found.get("versions") or []))),
        ("Format", found.get("format") or "-"),
        ("Sha256", found.get("sha256", "")),
        ("Comment", latest.get("comment") or "-"),
        ("Used by", ", ".join(found.get("used_by") or []) or "-"),
    ]))
    rows = [[i["instance"], i.get("node") or "-", f"v{i.get('pinned')}",
             f"v{i.get('has')}" if i.get("has") else "-"]
            for i in found.get("instances") or []]
    if rows:
        click.echo("\nInstances:")
        click.echo(table(["instance", "node", "pinned", "has"], rows))
    rollouts = [[r["app"], f"v{r.get('version')}", f"v{r['from']}" if r.get("from") else "-",
                 str(r.get("state")), r.get("reason") or "-"]
                for r in found.get("rollouts") or []]
    if rollouts:
        click.echo("\nRollouts:")
        click.echo(table(["app", "pinned", "before", "state", "why it failed"], rollouts))
    click.echo("\nFiles:")
    for fname, text in sorted((latest.get("files") or {}).items()):
        click.echo(f"--- {fname} ({len(text.encode())} bytes)")
        click.echo(text.rstrip("\n"))


@config.command("history")
@click.argument("name")
@namespace_option
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def history(settings: Settings, name: str, namespace: str, fmt: str) -> None:
    """The kept versions of config NAME, newest first."""
    found = items(settings.client().get(api_path("configs", namespace, name, "versions")))
    if fmt != "table":
        emit(found, fmt)
        return
    now = time.time()
    click.echo(table(["version", "age", "author", "sha256", "files", "comment"], [
        [str(v.get("version")), age(v.get("created"), now), v.get("author") or "-",
         str(v.get("sha256", ""))[:12], ",".join(sorted(v.get("files") or {})),
         v.get("comment") or ""]
        for v in found]))


def _version(settings: Settings, namespace: str, name: str, version: int) -> dict[str, Any]:
    return obj(settings.client().get(api_path("configs", namespace, name, "versions",
                                              str(version))), "a config version")


@config.command("diff")
@click.argument("name")
@click.argument("old", type=click.IntRange(min=1))
@click.argument("new", type=click.IntRange(min=1))
@namespace_option
@click.pass_obj
def diff(settings: Settings, name: str, old: int, new: int, namespace: str) -> None:
    """A unified diff of the files of two versions (exit code 1 when they differ)."""
    a = _version(settings, namespace, name, old).get("files") or {}
    b = _version(settings, namespace, name, new).get("files") or {}
    lines: list[str] = []
    for fname in sorted(set(a) | set(b)):
        lines += difflib.unified_diff(
            str(a.get(fname, "")).splitlines(keepends=True),
            str(b.get(fname, "")).splitlines(keepends=True),
            f"{name}@{old}/{fname}" if fname in a else "/dev/null",
            f"{name}@{new}/{fname}" if fname in b else "/dev/null")
    click.echo("".join(lines), nl=False)
    if lines:
        raise click.exceptions.Exit(1)


@config.command("edit")
@click.argument("name")
@namespace_option
@click.option("-m", "--comment", default="", help="Why (kept in the history).")
@click.pass_obj
def edit(settings: Settings, name: str, namespace: str, comment: str) -> None:
    """Edit the latest version's files in $EDITOR; saving a change makes a new version."""
    found = obj(settings.client().get(api_path("configs", namespace, name)), "a config")
    latest = found.get("latest_version") or {}
    files = latest.get("files") or {}
    text = yaml.safe_dump(files, default_flow_style=False, allow_unicode=True,
                          default_style="|")
    edited = click.edit(text, extension=".yaml")
    if edited is None or edited == text:
        click.echo("no change: nothing written")
        return
    try:
        new = yaml.safe_load(edited)
    except yaml.YAMLError as exc:
        raise CtlError(f"the edited text is not valid YAML ({exc}): nothing written") from None
    _post(settings, namespace, name, {"files": new, "format": found.get("format") or "",
                                      "comment": comment or "edited"}, False)


@config.command("rollback")
@click.argument("name")
@click.option("--to", type=click.IntRange(min=1), help="The version whose files to take "
              "back (default: the one before the latest).")
@namespace_option
@dry_run_option
@click.pass_obj
def rollback(settings: Settings, name: str, to: int | None, namespace: str,
             dry_run: bool) -> None:
    """Make a new version with the files of an older one (the history keeps both)."""
    params = {"dry_run": "true"} if dry_run else None
    _said(settings.client().post_json(api_path("configs", namespace, name, "rollback"),
                                      {"to": to or 0}, params), dry_run)


@config.command("delete")
@click.argument("name")
@namespace_option
@click.pass_obj
def delete(settings: Settings, name: str, namespace: str) -> None:
    """Delete config NAME and its versions (refused while an app uses it)."""
    settings.client().delete(api_path("configs", namespace, name))
    click.echo(f"config {namespace}/{name} deleted")
