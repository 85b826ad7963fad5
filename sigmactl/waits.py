"""Waiting for what the cluster does after a write: an app's instances running as its spec
says (replicas, template, caps and requests), or gone."""

from __future__ import annotations

import sys
import time
from typing import Any

from sigmactl import output
from sigmactl.base import items, obj
from sigmactl.client import Client, CtlError, api_path

POLL_INTERVAL = 0.5


def settled(app: dict[str, Any], instances: list[dict[str, Any]]) -> tuple[int, int, str]:
    """How many of the app's replicas are Running as its spec says (template generation,
    caps applied, request booked), out of how many; and what one that is not waits for."""
    spec = app.get("spec") or {}
    limits = {c["name"]: c["resources"]["limit"] for c in spec.get("containers") or []}
    request = {"cpu_m": 0, "memory": 0}
    for c in spec.get("containers") or []:
        for k in request:
            request[k] += c["resources"]["request"][k]
    done, why = 0, ""
    for i in instances:
        if i.get("index", 0) >= app.get("replicas", 0):
            why = why or f"{i.get('name')} is {i.get('state')}"
            continue
        caps = all(c.get("limit") == limits.get(c.get("name")) for c in i.get("containers") or [])
        if i.get("state") == "Running" and caps and i.get("request") == request and \
                i.get("generation") == app.get("template_generation"):
            done += 1
        elif not why:
            why = f"{i.get('name')}: {i.get('reason') or i.get('state')}"
    return done, int(app.get("replicas", 0)), why


def until_settled(client: Client, namespace: str, name: str, timeout: float) -> int:
    """Wait (with a progress line) until every replica of the app runs as its spec says;
    how many there are. CtlError after `timeout` seconds, saying what one waits for."""
    progress = output.Progress(sys.stderr)
    deadline = time.monotonic() + timeout
    try:
        while True:
            app = obj(client.get(api_path("apps", namespace, name)), "an app")
            found = items(client.get(api_path("instances"),
                                     {"namespace": namespace, "app": name}))
            done, want, why = settled(app, found)
            if done == want and len(found) == want:
                return want
            if time.monotonic() >= deadline:
                raise CtlError(f"app {namespace}/{name}: {done}/{want} running as specified "
                               f"after {timeout:g}s ({why or 'instances being created'}); see "
                               f"'sigmactl get instances -n {namespace} --app {name} -o wide'")
            progress.show(f"{namespace}/{name}: {done}/{want} running as specified"
                          + (f" ({why})" if why else ""))
            time.sleep(POLL_INTERVAL)
    finally:
        progress.clear()


def until_gone(client: Client, namespace: str, app: str, timeout: float) -> None:
    """Poll until the app has no instances left, or fail after `timeout` seconds."""
    progress = output.Progress(sys.stderr)
    deadline = time.monotonic() + timeout
    try:
        while left := items(client.get(api_path("instances"),
                                        {"namespace": namespace, "app": app})):
            count = output.plural(len(left), "instance")
            if time.monotonic() >= deadline:
                raise CtlError(
                    f"{count} of app {namespace}/{app} still terminating after {timeout:g}s: "
                    f"check with 'sigmactl get instances -n {namespace} --app {app}'"
                )
            progress.show(f"waiting for {count} to stop...")
            time.sleep(POLL_INTERVAL)
    finally:
        progress.clear()
