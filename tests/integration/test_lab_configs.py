"""The config center on the lab (real etcd, agents, dockerd, overlay, TLS): three httpd
replicas serve a config file while a new version rolls out, polled over the overlay every
100 ms; busybox `trap` sees SIGHUP; env_from reaches the environment; an agent killed mid-
delivery still delivers; a version that fails the readiness probe after its SIGHUP reverts by
itself; an agent SIGKILLed mid-rollout does not break the batches or the answers; in an HA
pair, the standby finishes a rollout whose leader was SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from sigmad.lab import Lab
from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, leader, pair_config

OLD = "old-" + "a" * 65536  # large: a half-written file would show as a short answer
NEW = "new-" + "b" * 65536
# sh as PID 1 traps SIGHUP (counts it), httpd serves the config's directory.
SERVE = ("mkdir -p /tmp; trap 'echo hup >> /tmp/hups' HUP; httpd -p 8080 -h /etc/web; "
         "while true; do sleep 0.1; done")


def config(lab: LabCluster, name: str, files: dict[str, str], *extra: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        args = []
        for fname, text in files.items():
            Path(d, fname).write_text(text)
            args += ["--from-file", f"{fname}={Path(d, fname)}"]
        result = lab.ctl("config", "create", name, *args, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def served_app(lab: LabCluster, app: str, replicas: int, **extra: Any) -> dict[str, Any]:
    return {"app": app, "replicas": replicas, "containers": [{
        "name": "main", "image": lab.lab.image, "command": ["sh", "-c", SERVE],
        "ready": {"tcp": 8080, "timeout": 20},
        "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                      "limit": {"memory": "64Mi"}}}], **extra}


def has(lab: LabCluster, app: str, version: int) -> bool:
    return all(i.get("configs_have", {}).get("web-conf") == version and
               i["state"] == "Running" for i in lab.instances(app))


def reloading(inst: dict[str, Any], version: int, config: str = "web-conf") -> bool:
    """Pinned to `version` and not settled on it: its containers not yet on it, or its reload
    not yet checked (not ready again), or not Running."""
    return inst.get("configs", {}).get(config) == version and (
        inst.get("configs_have", {}).get(config) != version or bool(inst.get("reloaded_at"))
        or inst["state"] != "Running")


def reloading_at_most(lab: LabCluster, app: str, version: int, timeout: float) -> int:
    """Sample the app's instances until all run `version`, their reloads checked: the most
    seen reloading at once."""
    deadline, most = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        found = lab.instances(app)
        most = max(most, sum(1 for i in found if reloading(i, version)))
        if all(i.get("configs_have", {}).get("web-conf") == version and i["state"] == "Running"
               and not i.get("reloaded_at") for i in found):
            return most
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for version {version} on every "
                         f"instance of {app}")


class Poll:
    """From inside `poller`, fetch index.html of every instance over the overlay every 100 ms
    (250 rounds at most); `answers()`: each answer's first 8 bytes and its length."""

    def __init__(self, lab: LabCluster, poller: dict[str, Any], ips: list[str]) -> None:
        loop = (f"for n in $(seq 1 250); do for ip in {' '.join(ips)}; do "
                "b=$(timeout 3 wget -qO- http://$ip:8080/index.html); "
                "echo \"$ip $(printf %s \"$b\" | head -c 8)$(printf %s \"$b\" | wc -c)\"; "
                "done; "
                "sleep 0.1; done")
        self.proc = subprocess.Popen(["docker", "-H", lab.lab.engines[poller["node"]], "exec",
                                      poller["containers"][0]["id"], "sh", "-c", loop],
                                     stdout=subprocess.PIPE, text=True)

    def answers(self) -> list[str]:
        """Stop polling: the answers, in order."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]


def whole(answers: list[str]) -> None:
    """Every answer is all of OLD or all of NEW (never empty or cut), old first, new last."""
    print(f"{len(answers)} answers: {sorted(set(answers))}")
    both = {OLD[:8] + str(len(OLD)), NEW[:8] + str(len(NEW))}
    assert set(answers) <= both, sorted(set(answers) - both)[:5]
    assert answers[0].startswith("old-") and answers[-1].startswith("new-")
    assert len(answers) >= 30  # sampled before, during and after


def test_a_new_version_is_served_whole_by_every_replica(lab: LabCluster) -> None:
    config(lab, "web-conf", {"index.html": OLD})
    try:
        lab.apply(served_app(lab, "cfg", 3, configs=[{
            "name": "web-conf", "mount": "/etc/web", "on_change": "signal:SIGHUP"}]))
        found = lab.running("cfg", 3)
        wait_for(lambda: has(lab, "cfg", 1), 60, "version 1 in place")
        poll = Poll(lab, found[0], [i["ip"] for i in found])
        try:
            time.sleep(2)
            dry = lab.ctl("config", "create", "web-conf", "--dry-run", "--from-file",
                          "/dev/null")
            assert "would take" in dry.stdout and dry.stdout.count("instance default/cfg-") \
                == 3, dry.stdout + dry.stderr
            config(lab, "web-conf", {"index.html": NEW}, "-m", "new content")
            busy = reloading_at_most(lab, "cfg", 2, 60)
            assert busy <= 1, f"{busy} instances took the new version at once (max_parallel 1)"
            time.sleep(2)
        finally:
            answers = poll.answers()
        whole(answers)
        for inst in lab.instances("cfg"):
            hups = lab.in_instance(inst, "cat", "/tmp/hups").stdout
            assert hups.split() == ["hup"], (inst["name"], hups)
        wide = lab.ctl("get", "instances", "--app", "cfg", "-o", "wide").stdout
        assert wide.count("web-conf:v2") == 3, wide
        history = lab.ctl("config", "history", "web-conf").stdout
        assert "new content" in history, history
        refused = lab.ctl("config", "delete", "web-conf")
        assert refused.returncode == 1 and "default/cfg" in refused.stderr, refused.stderr
    finally:
        lab.delete("cfg")
        lab.ctl("config", "delete", "web-conf")


def test_env_from_and_an_agent_killed_mid_delivery(lab: LabCluster) -> None:
    config(lab, "web-env", {"env": "GREETING='hi there'\n"}, "--format", "env")
    config(lab, "web-conf", {"index.html": "one"})
    try:
        lab.apply(served_app(lab, "envy", 2, configs=[{"name": "web-conf", "mount": "/etc/web"}],
                             env_from=[{"config": "web-env", "file": "env"}]))
        found = lab.running("envy", 2)
        for inst in found:
            said = lab.in_instance(inst, "sh", "-c", "echo $GREETING").stdout.strip()
            assert said == "hi there", said
        node = found[0]["node"]
        agent = lab.lab.host(node).agent_pid
        config(lab, "web-conf", {"index.html": "two"})
        os.kill(agent, signal.SIGKILL)  # mid-delivery (or just before it)
        lab.lab.restart_agent(node)
        wait_for(lambda: has(lab, "envy", 2), 60, "version 2 on every instance")
        for inst in lab.instances("envy"):
            text = lab.in_instance(inst, "cat", "/etc/web/index.html").stdout
            assert text == "two", (inst["name"], text)
    finally:
        lab.delete("envy")
        lab.ctl("config", "delete", "web-conf")
        lab.ctl("config", "delete", "web-env")


# sh as PID 1 serves the config's directory; it is ready while /tmp/ok exists, which each
# SIGHUP decides anew: a version whose index.html starts with "bad" makes it not ready.
CHECKED = ("mkdir -p /tmp; check() { if grep -q '^bad' /etc/web/index.html; then rm -f "
           "/tmp/ok; else touch /tmp/ok; fi; }; check; trap check HUP; "
           "httpd -p 8080 -h /etc/web; while true; do sleep 0.1; done")


def rollout_of(lab: LabCluster, config_name: str, app: str) -> dict[str, Any]:
    found = lab.ctl("config", "describe", config_name, "-o", "json")
    assert found.returncode == 0, found.stderr
    (row,) = [r for r in json.loads(found.stdout)["rollouts"] if r["app"] == f"default/{app}"]
    return row  # type: ignore[no-any-return]


def test_a_version_that_fails_the_probe_after_its_reload_reverts_by_itself(
        lab: LabCluster) -> None:
    config(lab, "web-bad", {"index.html": OLD})
    try:
        spec = served_app(lab, "cfgbad", 3, configs=[{
            "name": "web-bad", "mount": "/etc/web", "on_change": "signal:SIGHUP"}],
            update={"max_parallel": 1, "progress_deadline": 4})
        spec["containers"][0]["command"] = ["sh", "-c", CHECKED]
        spec["containers"][0]["ready"] = {"exec": ["test", "-f", "/tmp/ok"], "timeout": 60}
        lab.apply(spec)
        lab.running("cfgbad", 3)
        wait_for(lambda: all(i.get("configs_have", {}).get("web-bad") == 1
                             for i in lab.instances("cfgbad")), 60, "version 1 in place")
        config(lab, "web-bad", {"index.html": "bad-" + "c" * 1000})
        took: set[str] = set()  # the instances seen pinned to v2
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            found = lab.instances("cfgbad")
            took |= {i["name"] for i in found if i["configs"].get("web-bad") == 2}
            assert sum(1 for i in found if reloading(i, 2, "web-bad")) <= 1
            if rollout_of(lab, "web-bad", "cfgbad")["state"] == "reverted":
                break
            time.sleep(0.1)
        row = rollout_of(lab, "web-bad", "cfgbad")
        assert row["state"] == "reverted", (row, lab.ctl("events", "--app", "cfgbad", "-o",
                                                         "json").stdout)
        assert took == {"cfgbad-0"}, (took, lab.ctl("events", "--app", "cfgbad", "-o",
                                                    "json").stdout)
        assert row["version"] == 1 and row["reason"].startswith(
            "configs web-bad v1 → v2 failed on instance cfgbad-0: not ready again within 4s "
            "of its reload"), row["reason"]
        assert row["reason"].endswith("; reverted to web-bad v1"), row["reason"]
        for inst in lab.instances("cfgbad"):
            assert inst["configs"] == inst["configs_have"] == {"web-bad": 1}, inst
            assert inst["state"] == "Running" and not inst["reloaded_at"], inst
            served = lab.in_instance(inst, "wget", "-qO-", "http://127.0.0.1:8080/index.html")
            assert served.stdout == OLD, (inst["name"], served.stdout[:20])
        events = lab.ctl("events", "--app", "cfgbad", "-o", "json")
        assert "failed on instance cfgbad-0" in events.stdout, events.stdout[-2000:]
        described = lab.ctl("describe", "app", "cfgbad").stdout
        assert "Config rollout:" in described and "failed on instance cfgbad-0" in described, \
            described
    finally:
        lab.delete("cfgbad")
        lab.ctl("config", "delete", "web-bad")


def test_an_agent_sigkilled_mid_rollout_the_rollout_finishes_in_batches(
        lab: LabCluster) -> None:
    """The agent of the host of the instance whose batch comes second dies (SIGKILL) as the
    new version starts out, and is started again: every instance ends on the new version,
    never more than one reloading at once, and every answer is the old or the new file."""
    config(lab, "web-conf", {"index.html": OLD})
    try:
        lab.apply(served_app(lab, "cfgkill", 3, configs=[{
            "name": "web-conf", "mount": "/etc/web", "on_change": "signal:SIGHUP"}]))
        found = lab.running("cfgkill", 3)
        wait_for(lambda: has(lab, "cfgkill", 1), 60, "version 1 in place")
        node = next(i for i in found if i["name"] == "cfgkill-1")["node"]
        poll = Poll(lab, found[0], [i["ip"] for i in found])
        try:
            time.sleep(2)
            config(lab, "web-conf", {"index.html": NEW})
            os.kill(lab.lab.host(node).agent_pid, signal.SIGKILL)
            done: list[int | Exception] = []  # the sampler's answer, or what it raised

            def sample() -> None:
                try:
                    done.append(reloading_at_most(lab, "cfgkill", 2, 120))
                except Exception as exc:  # (raised here below, not lost with the thread)
                    done.append(exc)

            sampler = threading.Thread(target=sample)
            sampler.start()
            time.sleep(1)
            lab.lab.restart_agent(node)
            sampler.join()
            if isinstance(done[0], Exception):
                raise done[0]
            assert done[0] <= 1, f"{done} instances reloading at once (max_parallel 1)"
            time.sleep(2)
        finally:
            answers = poll.answers()
        whole(answers)
        for inst in lab.instances("cfgkill"):
            text = lab.in_instance(inst, "cat", "/etc/web/index.html").stdout
            assert text == NEW, (inst["name"], text[:20])
        assert rollout_of(lab, "web-conf", "cfgkill")["state"] == "done"
    finally:
        lab.delete("cfgkill")
        lab.ctl("config", "delete", "web-conf")


def test_the_standby_finishes_a_config_rollout_whose_leader_was_sigkilled(
        tmp_path: Path) -> None:
    """An HA pair: the leader is SIGKILLed once the first instance took the new version; the
    standby carries on from etcd (the pins, what each instance has, its reload's check): every
    instance ends on the new version, never more than one reloading at once."""
    built = Lab(pair_config(tmp_path, "cf", 73))
    try:
        built.up()
        lab = LabCluster(built, tmp_path)

        def sample() -> list[dict[str, Any]] | None:
            """The instances as the leader sees them (None while no master answers)."""
            found = lab.ctl("get", "instances", "--app", "cfgha", "-o", "json")
            return yaml.safe_load(found.stdout) if found.returncode == 0 else None

        api, pid = leader(lab)
        lab.env["SIGMA_SERVER"] = api
        config(lab, "web-conf", {"index.html": OLD})
        lab.apply(served_app(lab, "cfgha", 3, configs=[{
            "name": "web-conf", "mount": "/etc/web", "on_change": "signal:SIGHUP"}]))
        lab.running("cfgha", 3)
        wait_for(lambda: has(lab, "cfgha", 1), 60, "version 1 in place")
        config(lab, "web-conf", {"index.html": NEW})
        most, killed, new_api = 0, False, ""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            found = sample()
            if found is None:
                new_api = leader(lab)[0]
                lab.env["SIGMA_SERVER"] = new_api
                continue
            most = max(most, sum(1 for i in found if reloading(i, 2)))
            if not killed and any(i["configs_have"].get("web-conf") == 2 for i in found):
                assert not all(i["configs_have"].get("web-conf") == 2 for i in found)
                os.kill(pid, signal.SIGKILL)  # mid-rollout
                killed = True
            if killed and all(i["configs_have"].get("web-conf") == 2 and not i["reloaded_at"]
                              and i["state"] == "Running" for i in found):
                break
            time.sleep(0.05)
        assert killed and new_api and new_api != api, (killed, api, new_api)
        assert most <= 1, f"{most} instances reloading at once (max_parallel 1)"
        assert rollout_of(lab, "web-conf", "cfgha")["state"] == "done"
        for inst in lab.instances("cfgha"):
            assert inst["configs_have"] == {"web-conf": 2}, inst
            text = lab.in_instance(inst, "cat", "/etc/web/index.html").stdout
            assert text == NEW, (inst["name"], text[:20])
            hups = lab.in_instance(inst, "cat", "/tmp/hups").stdout.split()
            assert hups and set(hups) == {"hup"}, (inst["name"], hups)
    finally:
        built.down()
