"""The config center on the lab (real etcd, agents, dockerd, overlay, TLS): three httpd
replicas serve a config file while a new version rolls out, polled over the overlay every
100 ms; busybox `trap` sees SIGHUP; env_from reaches the environment; an agent killed mid-
delivery still delivers."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster

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


def reloading_at_most(lab: LabCluster, app: str, version: int, timeout: float) -> int:
    """Sample the app's instances until all run `version`: the most seen at once pinned to it
    with their containers not yet on it (taking it)."""
    deadline, most = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        found = lab.instances(app)
        most = max(most, sum(1 for i in found if i.get("configs", {}).get("web-conf") == version
                             and i.get("configs_have", {}).get("web-conf") != version))
        if all(i.get("configs_have", {}).get("web-conf") == version and i["state"] == "Running"
               for i in found):
            return most
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for version {version} on every "
                         f"instance of {app}")


def test_a_new_version_is_served_whole_by_every_replica(lab: LabCluster) -> None:
    config(lab, "web-conf", {"index.html": OLD})
    try:
        lab.apply(served_app(lab, "cfg", 3, configs=[{
            "name": "web-conf", "mount": "/etc/web", "on_change": "signal:SIGHUP"}]))
        found = lab.running("cfg", 3)
        wait_for(lambda: has(lab, "cfg", 1), 60, "version 1 in place")
        ips = " ".join(i["ip"] for i in found)
        poller = found[0]
        loop = (f"for n in $(seq 1 250); do for ip in {ips}; do "
                "b=$(timeout 3 wget -qO- http://$ip:8080/index.html); "
                "echo \"$ip $(printf %s \"$b\" | head -c 8)$(printf %s \"$b\" | wc -c)\"; "
                "done; "
                "sleep 0.1; done")
        proc = subprocess.Popen(["docker", "-H", lab.lab.engines[poller["node"]], "exec",
                                 poller["containers"][0]["id"], "sh", "-c", loop],
                                stdout=subprocess.PIPE, text=True)
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
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        answers = [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]
        print(f"{len(answers)} answers: {sorted(set(answers))}")
        whole = {OLD[:8] + str(len(OLD)), NEW[:8] + str(len(NEW))}  # never empty or cut
        assert set(answers) <= whole, sorted(set(answers) - whole)[:5]
        assert answers[0].startswith("old-") and answers[-1].startswith("new-")
        assert len(answers) >= 30  # sampled before, during and after (250 rounds at most)
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
