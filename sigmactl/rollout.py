"""`sigmactl rollout history|diff|status|undo|pause|resume|promote|restart` and `sigmactl
release`: an app's revisions and its rolling release (issue 12)."""

from __future__ import annotations

import difflib
import sys
import time
from typing import Any

import click
import yaml

from sigmactl import output
from sigmactl.base import Settings, emit, namespace_option, obj, output_option
from sigmactl.client import Client, CtlError, api_path

POLL_INTERVAL = 0.5
BAR = 20  # characters of the progress bar
ENDED = ("done", "reverted", "paused", "canary")  # phases `status -w` stops at


@click.group()
def rollout() -> None:
    """An app's releases: its revisions."""


def _answer(settings: Settings, app: str, namespace: str) -> dict[str, Any]:
    return _read(settings.client(), namespace, app)


def _read(client: Client, namespace: str, app: str) -> dict[str, Any]:
    return obj(client.get(api_path("apps", namespace, app, "rollout")), "an app's revisions")


def counts(answer: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """Of the app's instances: how many run the rollout's target revision, how many of
    those are ready, how many are failing, how many are moving; and how many there are."""
    r = answer.get("rollout") or {}
    target = r.get("from_revision") if r.get("phase") in ("reverting", "reverted") \
        else r.get("to_revision", answer.get("current"))
    insts = answer.get("instances") or []
    on = [i for i in insts if i["revision"] == target]
    ended = r.get("phase") in ENDED  # (a failed step's mark goes just after the record)
    return (len(on), sum(1 for i in on if i["ready"] and (ended or not i["release"])),
            0 if ended else sum(1 for i in insts if i["failing"]),
            sum(1 for i in insts if i["moving"]), len(insts))


def progress_text(answer: dict[str, Any]) -> str:
    """One line: a bar of the instances ready on the target revision, the counts, the phase."""
    r = answer.get("rollout") or {}
    on, ready, failing, moving, total = counts(answer)
    filled = BAR * ready // total if total else BAR
    target = r.get("from_revision") if r.get("phase") in ("reverting", "reverted") \
        else r.get("to_revision")
    text = (f"[{'#' * filled}{'.' * (BAR - filled)}] {on}/{total} on revision {target}, "
            f"{ready} ready, {moving} moving, {failing} failing; {r.get('phase', 'none')}")
    return text + (f": {r['reason']}" if r.get("reason") else "")


def failed(answer: dict[str, Any]) -> bool:
    """Whether the rollout failed (reverted, or paused by a failure)."""
    r = answer.get("rollout") or {}
    return r.get("phase") == "reverted" or (
        r.get("phase") == "paused" and not str(r.get("reason", "")).startswith("paused by"))


def follow(client: Client, namespace: str, app: str, timeout: float) -> dict[str, Any]:
    """Show the rollout's progress until it ends (done, reverted, paused or in canary);
    the last answer. CtlError after `timeout` seconds."""
    progress = output.Progress(sys.stderr)
    deadline = time.monotonic() + timeout
    try:
        while True:
            answer = _read(client, namespace, app)
            r = answer.get("rollout")
            if r is None or r.get("phase") in ENDED:
                return answer
            if time.monotonic() >= deadline:
                raise CtlError(f"the rollout of {namespace}/{app} is still going after "
                               f"{timeout:g}s ({progress_text(answer)}); follow it with "
                               f"'sigmactl rollout status {app} -n {namespace} -w'")
            progress.show(progress_text(answer))
            time.sleep(POLL_INTERVAL)
    finally:
        progress.clear()


def ended_text(answer: dict[str, Any]) -> str:
    """What a finished rollout says (and what to do next when it did not finish)."""
    r = answer.get("rollout") or {}
    app = answer.get("app", "")
    phase = r.get("phase")
    if phase == "done":
        return f"revision {r['to_revision']} rolled out"
    if phase == "reverted":
        return (f"revision {r['to_revision']} failed and was reverted to revision "
                f"{r['from_revision']}: {r.get('reason')}")
    if phase == "canary":
        return (f"canary of revision {r['to_revision']} is ready: 'sigmactl rollout promote "
                f"{app}' to go on, 'sigmactl rollout undo {app}' to go back")
    return (f"rollout to revision {r.get('to_revision')} paused: {r.get('reason')}; "
            f"'sigmactl rollout resume {app}' to go on, 'sigmactl rollout undo {app}' to "
            "go back")


def history_text(answer: dict[str, Any], now: float) -> str:
    """The kept revisions, oldest first; the current one marked with *; a restart says so."""
    rows = [[("*" if r["revision"] == answer["current"] else "") + str(r["revision"]),
             output.age(r["created"], now), ",".join(r["images"]),
             ",".join(f"{k}@{v}" for k, v in sorted(r["configs"].items())) or "-",
             "restart" if r.get("restart") else "-"]
            for r in answer["revisions"]]
    return output.table(["REVISION", "AGE", "IMAGES", "CONFIGS", "NOTE"], rows)


@rollout.command()
@click.argument("app")
@namespace_option
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def history(settings: Settings, app: str, namespace: str, fmt: str) -> None:
    """The app's kept revisions (the last 20), with their images and config versions."""
    answer = _answer(settings, app, namespace)
    click.echo(history_text(answer, time.time())) if fmt == "table" else emit(answer, fmt)


def kept(answer: dict[str, Any], app: str, *wanted: int) -> list[dict[str, Any]]:
    """The revisions `wanted` of the answer; CtlError naming those not kept (and the kept)."""
    by_n = {r["revision"]: r for r in answer["revisions"]}
    gone = [str(n) for n in wanted if n not in by_n]
    if gone:
        have = ", ".join(str(n) for n in sorted(by_n)) or "none"
        which = f"revisions {' and '.join(gone)} are" if len(gone) > 1 else \
            f"revision {gone[0]} is"
        raise CtlError(f"{which} not kept by app {app} (kept: {have}); see 'sigmactl "
                       f"rollout history {app}'")
    return [by_n[n] for n in wanted]


def spec_yaml(spec: dict[str, Any]) -> list[str]:
    """A revision's spec as YAML lines, keys sorted (so two revisions compare line by line)."""
    return yaml.safe_dump(spec, sort_keys=True, allow_unicode=True,
                          default_flow_style=False).splitlines(keepends=True)


def diff_text(answer: dict[str, Any], app: str, n: int, m: int) -> str:
    """The config versions of revisions `n` and `m`, then a unified diff of their specs."""
    a, b = kept(answer, app, n, m)

    def pins(r: dict[str, Any]) -> str:
        return ", ".join(f"{k}@{v}" for k, v in sorted(r["configs"].items())) or "none"

    head = [f"configs of revision {n}: {pins(a)}", f"configs of revision {m}: {pins(b)}"]
    lines = list(difflib.unified_diff(spec_yaml(a["spec"]), spec_yaml(b["spec"]),
                                      f"revision {n}", f"revision {m}"))
    if not lines:
        return "\n".join([*head, f"the specs of revisions {n} and {m} are the same"])
    return "\n".join(head) + "\n" + "".join(lines).rstrip("\n")


@rollout.command()
@click.argument("app")
@click.argument("n", type=int)
@click.argument("m", type=int)
@namespace_option
@output_option("diff", "json", "yaml", default="diff")
@click.pass_obj
def diff(settings: Settings, app: str, n: int, m: int, namespace: str, fmt: str) -> None:
    """What changed from revision N to revision M of APP (both kept): their config versions
    and a unified diff of their specs; -o json gives both specs and config versions."""
    answer = _answer(settings, app, namespace)
    if fmt == "diff":
        click.echo(diff_text(answer, app, n, m))
        return
    a, b = kept(answer, app, n, m)
    emit({"from": {k: a[k] for k in ("revision", "configs", "spec")},
          "to": {k: b[k] for k in ("revision", "configs", "spec")}}, fmt)


def _said(answer: dict[str, Any], what: str) -> str:
    name, action = answer.get("app", ""), answer.get("action", "")
    return f"app {name} {action} ({what}, generation {answer.get('generation')})"


@rollout.command()
@click.argument("app")
@namespace_option
@click.option("-w", "--watch", is_flag=True, help="Follow the rollout until it ends.")
@click.option("--timeout", default=1800, show_default=True, help="Seconds to follow at most.")
@output_option("table", "json", "yaml", default="table")
@click.pass_obj
def status(settings: Settings, app: str, namespace: str, watch: bool, timeout: float,
           fmt: str) -> None:
    """The app's rollout: its phase and its instances on the new revision, ready, failing.
    Exits 1 when the rollout failed (reverted, or paused by a failure)."""
    client = settings.client()
    answer = follow(client, namespace, app, timeout) if watch else \
        _read(client, namespace, app)
    if fmt != "table":
        emit({"rollout": answer.get("rollout"), "instances": answer.get("instances")}, fmt)
    elif answer.get("rollout") is None:
        click.echo(f"app {namespace}/{app} has had no rollout (revision "
                   f"{answer.get('current')})")
    else:
        click.echo(progress_text(answer))
        if answer["rollout"]["phase"] in ENDED:
            click.echo(ended_text({**answer, "app": app}))
    if failed(answer):
        sys.exit(1)


def _act(settings: Settings, app: str, namespace: str, action: str) -> None:
    answer = obj(settings.client().post_json(
        api_path("apps", namespace, app, "rollout", action), {}), "a rollout record")
    click.echo(f"rollout of {namespace}/{app} to revision {answer.get('to_revision')}: "
               f"{answer.get('phase')}" + (" (promoted)" if answer.get("promoted") else ""))


@rollout.command()
@click.argument("app")
@namespace_option
@click.pass_obj
def pause(settings: Settings, app: str, namespace: str) -> None:
    """Start no more instances on the new revision (those under way finish)."""
    _act(settings, app, namespace, "pause")


@rollout.command()
@click.argument("app")
@namespace_option
@click.pass_obj
def resume(settings: Settings, app: str, namespace: str) -> None:
    """Carry on a paused rollout (a failed instance is tried again)."""
    _act(settings, app, namespace, "resume")


@rollout.command()
@click.argument("app")
@namespace_option
@click.pass_obj
def promote(settings: Settings, app: str, namespace: str) -> None:
    """Roll the new revision out to every instance after its canaries."""
    _act(settings, app, namespace, "promote")


@rollout.command()
@click.argument("app")
@namespace_option
@click.option("-w", "--wait", is_flag=True, help="Follow the restart until it ends.")
@click.option("--timeout", default=1800, show_default=True, help="Seconds to follow at most.")
@click.pass_obj
def restart(settings: Settings, app: str, namespace: str, wait: bool, timeout: float) -> None:
    """Make every instance of APP anew without changing its spec: a new revision ('restart'
    in 'rollout history'), rolled out as the app's update: block says (live moves keep the
    IPs, max_parallel at a time). Refused while a rollout is under way. With -w, exits 1 when
    the restart failed."""
    client = settings.client()
    answer = obj(client.post_json(api_path("apps", namespace, app, "rollout", "restart"), {}),
                 "a rollout record")
    click.echo(f"restarting {namespace}/{app}: revision {answer.get('to_revision')} is a "
               f"restart of revision {answer.get('from_revision')}" +
               ("" if wait else f" (follow it with 'sigmactl rollout status {app} -w')"))
    if wait:
        ended = follow(client, namespace, app, timeout)
        click.echo(ended_text({**ended, "app": app}))
        if failed(ended):
            sys.exit(1)


@rollout.command()
@click.argument("app")
@namespace_option
@click.option("--to", "to", type=click.IntRange(min=1), metavar="N",
              help="The revision to go back to (default: the one before the current).")
@click.pass_obj
def undo(settings: Settings, app: str, namespace: str, to: int | None) -> None:
    """Apply again the spec of a kept revision, keeping the replicas: a new revision,
    rolled out as the app's update: block says."""
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
    """Release a new image of APP: a new revision (see 'sigmactl rollout history'), rolled
    out as the app's update: block says (follow it with 'sigmactl rollout status APP -w')."""
    body = {"image": image} | ({"container": container} if container else {})
    answer = obj(settings.client().post_json(api_path("apps", namespace, app, "release"),
                                             body), "an apply result")
    click.echo(_said(answer, f"image {image}"))
