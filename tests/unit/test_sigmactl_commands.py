"""`sigmactl update`, `events`, `pool`, `why` and the event-stream reader, against a tiny real
HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sigmactl import client as client_module
from sigmactl.client import UNAUTHORIZED, Client, CtlError, sse_data
from tests.unit.test_sigmactl_client import TOKEN, Fake, Stream, run, sse
from tests.unit.test_sigmactl_views import EVENT, NODE_EVENT, POOL

RESOURCES = "/v1/apps/default/web/resources"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": None}}


# the event-stream reader


def test_sse_data_joins_lines_and_skips_the_rest() -> None:
    lines = [b": keep-alive\n", b"event: change\n", b'data: {"a":\r\n', b"data: 1}\r\n",
             b"\r\n", b"\n", b'data:{"b": 2}\n', b"id: 7\n", b"\n", b'data: {"cut": 1}\n']
    assert list(sse_data(lines)) == [{"a": 1}, {"b": 2}]
    with pytest.raises(CtlError, match=r"^server sent an event that is not JSON: oops$"):
        list(sse_data([b"data: oops\n", b"\n"]))


def test_stream_reads_two_events_without_a_read_timeout(fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, Stream(sse(EVENT, NODE_EVENT), pause=0.6)))
    started = time.monotonic()
    got = list(Client(fake.url, TOKEN, timeout=0.3).events("/v1/events", {"watch": "true"}))
    assert got == [EVENT, NODE_EVENT]
    assert time.monotonic() - started >= 0.6  # waited past the timeout for the second event
    seen = fake.seen[-1]
    assert (seen["query"], seen["accept"]) == ("watch=true", "text/event-stream")


def test_stream_headers_keep_the_usual_timeout(fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, Stream(sse(EVENT), delay=1.0)))
    with pytest.raises(CtlError, match=r"^cannot reach sigma at .*timed out"):
        list(Client(fake.url, TOKEN, timeout=0.2).events("/v1/events"))


def test_stream_refuses_errors_and_other_answers(fake: Fake) -> None:
    with pytest.raises(CtlError) as err:
        list(Client(fake.url, "wrong").events("/v1/events"))
    assert str(err.value) == UNAUTHORIZED
    fake.answer("GET", "/v1/events", (200, Stream([b"{}"], content_type="application/json")))
    with pytest.raises(CtlError, match=r"^server answered application/json, not an event stream"):
        list(Client(fake.url, TOKEN).events("/v1/events"))


# update


def test_update_sends_only_the_given_values(fake: Fake) -> None:
    fake.answer("POST", RESOURCES, (200, {"app": "default/web", "action": "resized in place",
                                          "generation": 3, "containers": 2}))
    result = run(fake, "update", "web", "--limit-cpu", "4", "--limit-memory", "8Gi",
                 "--request-cpu", "500m", "--container", "main", "--force", "--no-wait")
    assert (result.exit_code, result.stdout) == (
        0, "app default/web resized in place (generation 3, 2 containers updated)\n")
    seen = fake.seen[-1]
    assert seen["type"] == "application/json"
    assert json.loads(seen["body"]) == {"limit": {"cpu": "4", "memory": "8Gi"},
                                        "request": {"cpu": "500m"}, "container": "main",
                                        "force": True}


def _app(limit: dict[str, int]) -> dict[str, object]:
    return {"namespace": "default", "app": "web", "replicas": 1, "template_generation": 1,
            "spec": {"containers": [{"name": "main", "resources": {
                "limit": limit, "request": {"cpu_m": 100, "memory": 0}}}]}}


def _instances(limit: dict[str, int]) -> dict[str, object]:
    return {"items": [{"name": "web-0", "index": 0, "state": "Running", "generation": 1,
                       "reason": "", "request": {"cpu_m": 100, "memory": 0},
                       "containers": [{"name": "main", "limit": limit}]}]}


def test_update_waits_until_every_container_has_the_new_caps(fake: Fake) -> None:
    old, new = {"cpu_m": 500, "memory": 0}, {"cpu_m": 2000, "memory": 0}
    fake.answer("POST", RESOURCES, (200, {"app": "default/web", "action": "resized in place",
                                          "generation": 2, "containers": 1}))
    fake.answer("GET", "/v1/apps/default/web", (200, _app(new)))
    fake.answer("GET", "/v1/instances", (200, _instances(old)), (200, _instances(new)))
    result = run(fake, "update", "web", "--limit-cpu", "2")
    assert (result.exit_code, result.stdout) == (
        0, "app default/web resized in place (generation 2, 1 container updated)\n")
    assert [s["path"] for s in fake.seen if s["method"] == "GET"].count("/v1/instances") == 2
    fake.answer("GET", "/v1/instances", (200, _instances(old)))
    result = run(fake, "update", "web", "--limit-cpu", "2", "--timeout", "0.2")
    assert result.exit_code == 1
    assert "0/1 running as specified after 0.2s (web-0: Running)" in result.stderr


def test_update_unchanged_and_json(fake: Fake) -> None:
    answer = {"app": "prod/web", "action": "unchanged", "generation": 2}
    fake.answer("POST", "/v1/apps/prod/web/resources", (200, answer))
    result = run(fake, "update", "web", "-n", "prod", "--request-memory", "2Gi")
    assert (result.exit_code, result.stdout) == (0, "app prod/web unchanged\n")
    assert json.loads(fake.seen[-1]["body"]) == {"request": {"memory": "2Gi"}}
    result = run(fake, "update", "web", "-n", "prod", "--request-memory", "2Gi", "-o", "json")
    assert json.loads(result.stdout) == answer


def test_update_argument_errors(fake: Fake) -> None:
    result = run(fake, "update", "web", "--force")
    assert result.exit_code == 2
    assert ("nothing to change: give --limit-cpu, --limit-memory, --request-cpu or "
            "--request-memory") in result.stderr
    result = run(fake, "update", "web", "--limit-memory", "lots")
    assert result.exit_code == 2
    assert '"lots" is not a size' in result.stderr
    assert fake.seen == []


def test_update_refused_prints_the_server_message(fake: Fake) -> None:
    message = ("request cpu 4 per instance does not fit on node h1: 1.5 of 2 already booked "
               "there (2 instances of web); nothing was changed")
    fake.answer("POST", RESOURCES, (409, _error("refused", message)))
    result = run(fake, "update", "web", "--request-cpu", "4")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


# events


def test_events_table_json_lines_and_filters(fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, {"items": [EVENT, NODE_EVENT]}))
    result = run(fake, "events")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TIME", "TYPE", "KIND", "OBJECT", "MESSAGE"]
    assert lines[1].split()[1:4] == ["Normal", "instance", "default/web-0"]
    assert lines[2].split()[1:4] == ["Warning", "node", "h1"]
    assert fake.seen[-1]["query"] == ""
    result = run(fake, "events", "-o", "json", "-n", "default", "--app", "web",
                 "--kind", "instance", "--limit", "0")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [EVENT, NODE_EVENT]
    assert fake.seen[-1]["query"] == "namespace=default&app=web&kind=instance&limit=0"


def test_events_empty_and_bad_options(fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, {"items": []}))
    result = run(fake, "events")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "No events found.\n")
    assert run(fake, "events", "--kind", "pod").exit_code == 2
    assert run(fake, "events", "--limit", "-1").exit_code == 2


def test_events_watch_prints_each_event_then_fails_when_closed(fake: Fake) -> None:
    fake.answer("GET", "/v1/events", (200, Stream(sse(EVENT, NODE_EVENT), pause=0.05)))
    result = run(fake, "events", "-w", "--app", "web")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [line.split()[1:4] for line in lines] == [
        ["TYPE", "KIND", "OBJECT"], ["Normal", "instance", "default/web-0"],
        ["Warning", "node", "h1"]]
    assert result.stderr == ("error: the server closed the event stream: run 'sigmactl events "
                             "-w' again to go on watching\n")
    assert fake.seen[-1]["query"] == "app=web&watch=true"
    result = run(fake, "events", "--watch", "-o", "json")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [EVENT, NODE_EVENT]


def test_events_watch_ends_quietly_on_ctrl_c(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = []

    def events(self: Client, path: str, params: dict[str, str]) -> Iterator[Any]:
        try:
            yield EVENT
            raise KeyboardInterrupt
        finally:
            closed.append(path)

    monkeypatch.setattr(client_module.Client, "events", events)
    result = run(fake, "events", "-w", "-o", "json")
    assert (result.exit_code, result.stderr) == (0, "")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [EVENT]
    assert closed == ["/v1/events"]


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_events_watch_ends_on_sigint_however_started(fake: Fake, inherited: Any) -> None:
    """A real SIGINT while the watch waits for its next event ends it at once, quietly, also
    when sigmactl was started with SIGINT ignored (as a non-interactive shell starts a
    background job): Python leaves an ignored SIGINT ignored."""
    fake.answer("GET", "/v1/events", (200, Stream(sse(EVENT, NODE_EVENT), pause=60)))
    previous = signal.signal(signal.SIGINT, inherited)  # the child inherits it through exec
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "sigmactl", "--server", fake.url, "--token", TOKEN,
             "events", "-w", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert json.loads(watch.stdout.readline()) == EVENT  # type: ignore[union-attr]
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
        assert (watch.returncode, out, err) == (0, "", "")
    finally:
        watch.kill()
        watch.wait()


# pool


def test_pool_table_and_raw(fake: Fake) -> None:
    fake.answer("GET", "/v1/pool", (200, POOL))
    result = run(fake, "pool")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["pool", "3", "5"]
    assert lines[2].startswith("overcommit in use: cpu 1.8x, memory 1.2x")
    assert lines[5].startswith("zone=room-a")
    assert json.loads(run(fake, "pool", "-o", "json").stdout) == POOL
    assert "by_label:" in run(fake, "pool", "-o", "yaml").stdout
    fake.answer("GET", "/v1/pool", (200, []))
    result = run(fake, "pool")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: server answered without a pool summary: ")


# why


def test_why_pending_and_running(fake: Fake) -> None:
    pending = {"namespace": "prod", "name": "web-3", "state": "Pending", "node": "",
               "reason": "3 nodes: labels mismatch", "containers": [],
               "unschedulable": {"labels mismatch": 3}}
    fake.answer("GET", "/v1/instances/prod/web-3", (200, pending))
    result = run(fake, "why", "web-3", "-n", "prod")
    assert (result.exit_code, result.stdout.splitlines()) == (0, [
        "web-3 is Pending: 3 nodes: labels mismatch", "FILTER           NODES",
        "labels mismatch  3"])
    data = json.loads(run(fake, "why", "web-3", "-n", "prod", "-o", "json").stdout)
    assert data["unschedulable"] == {"labels mismatch": 3}
    running = {**pending, "state": "Running", "node": "h1", "reason": ""}
    fake.answer("GET", "/v1/instances/prod/web-3", (200, running))
    result = run(fake, "why", "web-3", "-n", "prod")
    assert (result.exit_code, result.stdout) == (0, "web-3 is Running on h1\n")


def test_why_missing_instance(fake: Fake) -> None:
    fake.answer("GET", "/v1/instances/default/web-9",
                (404, _error("not_found", "instance default/web-9 not found")))
    result = run(fake, "why", "web-9")
    assert (result.exit_code, result.stderr) == (1, "error: instance default/web-9 not found\n")


# the new columns through the commands


def test_get_wide_and_describe_show_ports(fake: Fake) -> None:
    instance = {"namespace": "default", "app": "web", "index": 0, "name": "web-0",
                "state": "Running", "node": "h1", "host_ports": {"http": 31007},
                "containers": [{"name": "main", "id": "3f2a9b8c7d6e5f", "state": "running",
                                "ready": True}]}
    fake.answer("GET", "/v1/instances", (200, {"items": [instance]}))
    fake.answer("GET", "/v1/instances/default/web-0", (200, instance))
    wide = run(fake, "get", "instances", "-o", "wide").stdout.splitlines()
    assert wide[1].split()[wide[0].split().index("PORTS")] == "http:31007"
    text = run(fake, "describe", "instance", "web-0").stdout
    assert "Host ports:  http=31007" in text
    assert "  main  3f2a9b8c7d6e  running  yes" in text


# ssd


def test_ssd_release_posts_and_says_whose_data_goes(fake: Fake) -> None:
    fake.answer("POST", "/v1/ssds/h1/loop3/release",
                (200, {"node": "h1", "id": "loop3", "released": "default/db-0"}))
    result = run(fake, "ssd", "release", "h1/loop3")
    assert (result.exit_code, result.stdout) == (
        0, "disk h1/loop3 released (it held default/db-0's data); its agent wipes it\n")
    assert fake.seen[-1]["path"] == "/v1/ssds/h1/loop3/release"
    bad = run(fake, "ssd", "release", "loop3")
    assert bad.exit_code == 2 and "give NODE/ID" in bad.stderr


def test_describe_ssd_finds_it_by_node_and_id(fake: Fake) -> None:
    disk = {"node": "h1", "id": "loop3", "path": "/dev/loop3", "state": "retained", "error": "",
            "size": 10 << 30, "rotational": False, "claimed_by": "default/db-0",
            "mount": "/var/lib/sigma/ssds/loop3", "fs_uuid": "u-1", "updated": 0}
    fake.answer("GET", "/v1/ssds", (200, {"items": [disk]}))
    result = run(fake, "describe", "ssd", "h1/loop3")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[3].split() == ["State:", "retained"]
    assert "Claimed by:  default/db-0" in result.stdout and "Error:" in result.stdout
    missing = run(fake, "describe", "ssd", "h2/loop3")
    assert missing.exit_code == 1 and "ssd h2/loop3 not found" in missing.stderr


def test_ssd_cordon_and_uncordon(fake: Fake) -> None:
    fake.answer("POST", "/v1/ssds/h1/loop3/cordon", (200, {"cordoned": True}))
    fake.answer("POST", "/v1/ssds/h1/loop3/uncordon", (200, {"uncordoned": "x"}))
    cordon = run(fake, "ssd", "cordon", "h1/loop3")
    assert (cordon.exit_code, cordon.stdout) == (
        0, "disk h1/loop3 cordoned: nothing is placed on it\n")
    uncordon = run(fake, "ssd", "uncordon", "h1/loop3")
    assert (uncordon.exit_code, uncordon.stdout) == (
        0, "disk h1/loop3 uncordoned: its agent formats it afresh\n")
    assert fake.seen[-1]["path"] == "/v1/ssds/h1/loop3/uncordon"


# rollout diff


def _revision(n: int, image: str, configs: dict[str, int]) -> dict[str, Any]:
    return {"revision": n, "images": [image], "configs": configs, "created": 1.0,
            "spec": {"app": "web", "containers": [{"name": "main", "image": image}]}}


def test_rollout_diff_shows_the_config_versions_and_the_spec_diff(fake: Fake) -> None:
    fake.answer("GET", "/v1/apps/default/web/rollout", (200, {
        "current": 3, "rollout": None, "instances": [],
        "revisions": [_revision(2, "img:1", {}), _revision(3, "img:2", {"conf": 4})]}))
    result = run(fake, "rollout", "diff", "web", "2", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "configs of revision 2: none", "configs of revision 3: conf@4", "--- revision 2",
        "+++ revision 3", "@@ -1,4 +1,4 @@", " app: web", " containers:", "-- image: img:1",
        "+- image: img:2", "   name: main"]
    result = run(fake, "rollout", "diff", "web", "2", "3", "-o", "json")
    both = json.loads(result.stdout)
    assert (both["from"]["revision"], both["to"]["configs"]) == (2, {"conf": 4})
    assert both["to"]["spec"]["containers"][0]["image"] == "img:2"
    result = run(fake, "rollout", "diff", "web", "1", "3")
    assert result.exit_code == 1 and "revision 1 is not kept by app web (kept: 2, 3)" in \
        result.output, result.output


# rollout restart


def test_rollout_restart_says_the_revision_and_follows_with_wait(fake: Fake) -> None:
    path = "/v1/apps/default/web/rollout/restart"
    fake.answer("POST", path, (200, {"from_revision": 4, "to_revision": 5, "phase": "running"}))
    result = run(fake, "rollout", "restart", "web")
    assert (result.exit_code, result.stdout) == (0, (
        "restarting default/web: revision 5 is a restart of revision 4 (follow it with "
        "'sigmactl rollout status web -w')\n")), result.output
    done = {"from_revision": 4, "to_revision": 5, "phase": "done"}
    fake.answer("GET", "/v1/apps/default/web/rollout", (200, {
        "current": 5, "rollout": done, "instances": [], "revisions": []}))
    result = run(fake, "rollout", "restart", "web", "-w")
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == \
        "revision 5 rolled out", result.output
    fake.answer("POST", path, (409, _error("conflict", "the rollout of default/web to "
                                           "revision 5 is running: restart once it has ended")))
    result = run(fake, "rollout", "restart", "web")
    assert result.exit_code == 1 and "restart once it has ended" in result.output, result.output
