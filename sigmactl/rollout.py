"""`sigmactl rollout history`: an app's revisions (issue 12)."""

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
