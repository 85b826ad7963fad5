"""`sigmactl rollout history|undo` and `sigmactl release`: an app's revisions (issue 12)."""

from __future__ import annotations

import time
from typing import Any

import click

from sigmactl import output
from sigmactl.base import Settings, emit, namespace_option, obj, output_option
from sigmactl.client import api_path


@click.group()
def rollout() -> None:
    """An app's releases: its revisions."""


def _answer(settings: Settings, app: str, namespace: str) -> dict[str, Any]:
    return obj(settings.client().get(api_path("apps", namespace, app, "rollout")),
               "an app's revisions")


def history_text(answer: dict[str, Any], now: float) -> str:
    """The kept revisions, oldest first; the current one marked with *."""
    rows = [[("*" if r["revision"] == answer["current"] else "") + str(r["revision"]),
             output.age(r["created"], now), ",".join(r["images"]),
             ",".join(f"{k}@{v}" for k, v in sorted(r["configs"].items())) or "-"]
            for r in answer["revisions"]]
    return output.table(["REVISION", "AGE", "IMAGES", "CONFIGS"], rows)


@rollout.command()
@click.argument("app")
@namespace_option
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def history(settings: Settings, app: str, namespace: str, fmt: str) -> None:
    """The app's kept revisions (the last 20), with their images and config versions."""
    answer = _answer(settings, app, namespace)
    click.echo(history_text(answer, time.time())) if fmt == "table" else emit(answer, fmt)


def _said(answer: dict[str, Any], what: str) -> str:
    name, action = answer.get("app", ""), answer.get("action", "")
    return f"app {name} {action} ({what}, generation {answer.get('generation')})"


@rollout.command()
@click.argument("app")
@namespace_option
@click.option("--to", "to", type=click.IntRange(min=1), metavar="N",
              help="The revision to go back to (default: the one before the current).")
@click.pass_obj
def undo(settings: Settings, app: str, namespace: str, to: int | None) -> None:
    """Apply again the spec of a kept revision, keeping the replicas: a new revision.

    Every instance is replaced at once (rolling releases are not built yet)."""
    body = {} if to is None else {"to": to}
    answer = obj(settings.client().post_json(api_path("apps", namespace, app, "undo"), body),
                 "an apply result")
    click.echo(_said(answer, f"back to revision {to}" if to else "back one revision"))


@click.command()
@click.argument("app")
@namespace_option
@click.option("--image", required=True, metavar="REF", help="The new image, e.g. nginx:1.27.")
@click.option("--container", metavar="NAME", help="The container to change (needed when the "
              "app has several).")
@click.pass_obj
def release(settings: Settings, app: str, namespace: str, image: str,
            container: str | None) -> None:
    """Release a new image of APP: a new revision (see 'sigmactl rollout history').

    Every instance is replaced at once (rolling releases are not built yet)."""
    body = {"image": image} | ({"container": container} if container else {})
    answer = obj(settings.client().post_json(api_path("apps", namespace, app, "release"),
                                             body), "an apply result")
    click.echo(_said(answer, f"image {image}"))
