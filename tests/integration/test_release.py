"""Rolling releases on the lab (real etcd, agents, dockerd, overlay): a 6-replica httpd app is
polled on every instance's overlay IP by three client containers while a release rolls out.
A good release answers every request (its live moves drain each old copy before the flip:
not even a connection open at a flip is reset) and never has more than `max_parallel`
instances in transition at any sample (read from etcd); a release of an image that does not exist
reverts by itself and the app ends on its old revision with every replica Running; on an HA
pair, the leader SIGKILLed mid-rollout, the standby finishes it; a canary waits for promote
and pause/resume keep it waiting; `rollout restart` makes every instance anew on its IP (a
second restart under way is refused) with the same zero-loss bar as a good release."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from sigmad.control.rollout import Rollout
from sigmad.lab import Lab
from sigmad.models import Instance
from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster, leader, pair_config, web

REPLICAS = 6
MAX_PARALLEL = 2


def release_app(lab: LabCluster, **extra: Any) -> dict[str, Any]:
    spec = web(lab, "rel", REPLICAS, update={"max_parallel": MAX_PARALLEL, "min_ready": "2s",
                                             "progress_deadline": "2m"})
    spec["containers"][0].update(extra)
    return spec


def pollers(lab: LabCluster, ips: list[str]) -> list[subprocess.Popen[str]]:
    """A client loop in each instance of app `poll`: every instance IP in turn, 10 rounds a
    second, one line per request (`IP ok|fail UPTIME`: the host's clock), until killed."""
    loop = (f"while true; do for ip in {' '.join(ips)}; do "
            "if e=$(timeout 3 wget -qO- http://$ip:8080/ 2>&1 >/dev/null); then r=ok; "
            "else r=fail; fi; echo \"$ip $r $(cut -d' ' -f1 /proc/uptime) $NODE $e\"; "
            "done; sleep 0.1; done")
    return [subprocess.Popen(["docker", "-H", lab.lab.engines[p["node"]], "exec", "-e",
                              f"NODE={p['node']}", p["containers"][0]["id"], "sh", "-c", loop],
                             stdout=subprocess.PIPE, text=True)
            for p in lab.running("poll", 3)]


def collect(procs: list[subprocess.Popen[str]]) -> tuple[Counter[str], list[str]]:
    """The answers by result, and the failed requests (`IP fail UPTIME`)."""
    out: Counter[str] = Counter()
    failed = []
    for p in procs:
        p.terminate()
        text, _ = p.communicate(timeout=30)
        lines = [line.split() for line in text.splitlines() if len(line.split()) >= 4]
        out.update(parts[1] for parts in lines)
        failed += [" ".join(parts) for parts in lines if parts[1] == "fail"]
    return out, failed


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class Sampler:
    """Reads the app's instance records and its rollout record from etcd every 0.2 s:
    the most instances ever in transition at once, and the phases seen."""

    def __init__(self, lab: LabCluster) -> None:
        self.lab = lab
        self.most = 0
        self.phases: list[str] = []
        self.samples = 0
        self.changes: list[str] = []  # `UPTIME name ip node next_node release` as they change
        self.flips: list[tuple[float, str]] = []  # (uptime first seen, IP) of each flip
        self.nodes: dict[str, str] = {}  # IP → the node its record last placed it on
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    async def _run(self) -> None:
        store = self.lab.etcd()
        keys = store.keys
        try:
            while not self.stop.is_set():
                found, _ = await store.scan(keys.instances("default", "rel"), Instance)
                busy = sum(1 for v in found if (v.value.release and not
                                                v.value.release_failed)
                           or v.value.move or v.value.next_node)
                self.most = max(self.most, busy)
                for v in found:
                    i = v.value
                    if self.nodes.get(i.ip, i.node) != i.node:
                        self.flips.append((uptime(), i.ip))
                    self.nodes[i.ip] = i.node
                    seen = f"{i.name} {i.ip} {i.node} {i.next_node} {i.release} {i.state}"
                    if not any(c.endswith(seen) for c in self.changes[-50:]):
                        self.changes.append(f"{uptime():.2f} {seen}")
                r = await store.get(keys.rollout("default", "rel"), Rollout)
                if r is not None and (not self.phases or self.phases[-1] != r.value.phase):
                    self.phases.append(str(r.value.phase))
                self.samples += 1
                await asyncio.sleep(0.2)
        finally:
            await store.close()


def rollout_of(lab: LabCluster) -> dict[str, Any]:
    result = lab.ctl("rollout", "status", "rel", "-o", "json")
    return dict(json.loads(result.stdout)["rollout"] or {})


def every_request_answered(answers: Counter[str], failed: list[str], sampler: Sampler) -> None:
    """Every request of the client loops answered, not even a connection open at a flip
    lost (each old copy drains first: no new connection reaches it, its open ones end, and
    only then does its IP flip); every instance flipped once; at most MAX_PARALLEL in
    transition at any sample."""
    print(f"answers {dict(answers)}; most in transition {sampler.most} over "
          f"{sampler.samples} samples; phases {sampler.phases}")
    if failed:
        print("\n".join(["failed:", *failed, "records:", *sampler.changes]))
    assert answers["ok"] > 300, answers
    assert failed == [], failed
    assert len(sampler.flips) == REPLICAS, sampler.changes
    assert 1 <= sampler.most <= MAX_PARALLEL, sampler.most


def test_a_good_release_answers_every_request_within_max_parallel(lab: LabCluster) -> None:
    lab.apply(web(lab, "poll", 3))
    lab.apply(release_app(lab))
    try:
        before = {i["name"]: (i["ip"], i["node"]) for i in lab.running("rel", REPLICAS)}
        procs = pollers(lab, sorted(ip for ip, _ in before.values()))
        try:
            time.sleep(2)
            with Sampler(lab) as sampler:
                applied = lab.ctl("apply", "-f", "-", "--wait", "--timeout", "300",
                                  stdin=yaml.safe_dump(
                                      release_app(lab, env={"RELEASE": "2"})))
                assert applied.returncode == 0, applied.stdout + applied.stderr
                time.sleep(2)
        finally:
            answers, failed = collect(procs)
        every_request_answered(answers, failed, sampler)
        assert sampler.phases[-1] == "done", sampler.phases
        after = lab.running("rel", REPLICAS)
        assert {i["name"]: i["ip"] for i in after} == \
            {n: ip for n, (ip, _) in before.items()}  # the same IPs
        assert all(i["node"] != before[i["name"]][1] for i in after)  # each moved live
        status = lab.ctl("rollout", "status", "rel")
        print(applied.stdout, applied.stderr, status.stdout, sep="\n")
        assert status.returncode == 0 and "rolled out" in status.stdout, status.stdout
    finally:
        lab.delete("rel")
        lab.delete("poll")


def test_restart_makes_every_instance_anew_on_its_ip_while_it_answers(lab: LabCluster) -> None:
    lab.apply(web(lab, "poll", 3))
    lab.apply(release_app(lab))
    try:
        before = {i["name"]: i for i in lab.running("rel", REPLICAS)}
        procs = pollers(lab, sorted(i["ip"] for i in before.values()))
        try:
            time.sleep(2)
            with Sampler(lab) as sampler:
                restarted = lab.ctl("rollout", "restart", "rel")
                assert restarted.returncode == 0 and "revision 2 is a restart of revision 1" \
                    in restarted.stdout, restarted.stdout + restarted.stderr
                again = lab.ctl("rollout", "restart", "rel")  # the first is under way
                assert again.returncode == 1 and "restart once it has ended" in again.stderr, \
                    again.stdout + again.stderr
                watched = lab.ctl("rollout", "status", "rel", "-w", "--timeout", "300")
                assert watched.returncode == 0 and "revision 2 rolled out" in watched.stdout, \
                    watched.stdout + watched.stderr
                time.sleep(2)
        finally:
            answers, failed = collect(procs)
        every_request_answered(answers, failed, sampler)
        after = lab.running("rel", REPLICAS)
        assert all(i["generation"] == 2 for i in after), after
        assert {i["name"]: i["ip"] for i in after} == \
            {n: i["ip"] for n, i in before.items()}  # the same IPs
        for i in after:  # each moved live: made anew, on another node
            old = before[i["name"]]
            assert i["node"] != old["node"], (i, old)
            assert {c["id"] for c in i["containers"]}.isdisjoint(
                {c["id"] for c in old["containers"]}), (i, old)
        history = lab.ctl("rollout", "history", "rel").stdout
        diff = lab.ctl("rollout", "diff", "rel", "1", "2")
        print(restarted.stdout, watched.stdout, history, diff.stdout, sep="\n")
        assert history.splitlines()[2].split()[0] == "*2" and \
            history.splitlines()[2].endswith("restart"), history
        assert diff.returncode == 0 and diff.stdout.rstrip().endswith(
            "the specs of revisions 1 and 2 are the same"), diff.stdout + diff.stderr
    finally:
        lab.delete("rel")
        lab.delete("poll")


def test_a_broken_image_reverts_by_itself_to_the_old_revision(lab: LabCluster) -> None:
    lab.apply(web(lab, "poll", 3))
    lab.apply(release_app(lab))
    try:
        before = lab.running("rel", REPLICAS)
        procs = pollers(lab, sorted(i["ip"] for i in before))
        try:
            time.sleep(2)
            broken = lab.ctl("release", "rel", "--image", lab.lab.image + "-missing")
            assert broken.returncode == 0, broken.stderr
            watched = lab.ctl("rollout", "status", "rel", "-w", "--timeout", "300")
            assert watched.returncode == 1, watched.stdout + watched.stderr  # it failed
            assert "reverted to revision 1" in watched.stdout, watched.stdout
            time.sleep(2)
        finally:
            answers, failed = collect(procs)
        print(f"answers {dict(answers)}")
        assert answers["fail"] == 0 and answers["ok"] > 100, (answers, failed)
        r = rollout_of(lab)
        assert r["phase"] == "reverted" and "-missing" in r["reason"], r
        after = wait_for(lambda: lab.running("rel", REPLICAS), 60, "all Running")
        assert all(i["generation"] == 1 for i in after), after
        assert {i["containers"][0]["id"] for i in after} == \
            {i["containers"][0]["id"] for i in before}  # never stopped
        history = lab.ctl("rollout", "history", "rel").stdout
        print(broken.stdout, watched.stdout, watched.stderr, history, sep="\n")
        assert history.splitlines()[1].split()[0] == "*1", history
    finally:
        lab.delete("rel")
        lab.delete("poll")


def test_the_standby_finishes_a_rollout_whose_leader_was_sigkilled(tmp_path: Path) -> None:
    """An HA pair: the leader is SIGKILLed mid-rollout; the standby reads the rollout record
    and the instances' steps from etcd and finishes the rollout."""
    built = Lab(pair_config(tmp_path, "rf", 74))
    try:
        built.up()
        lab = LabCluster(built, tmp_path)

        api, pid = leader(lab)
        lab.env["SIGMA_SERVER"] = api
        spec = web(lab, "rel", 4, update={"min_ready": "3s"})
        lab.apply(spec)
        before = {i["name"]: i["ip"] for i in lab.running("rel", 4)}
        spec["containers"][0]["env"] = {"RELEASE": "2"}
        lab.apply(spec)
        wait_for(lambda: sum(1 for i in lab.instances("rel") if i["generation"] == 2) >= 1,
                 60, "one instance on revision 2")
        os.kill(pid, signal.SIGKILL)

        def standby() -> str | None:
            now_api = leader(lab)[0]
            return now_api if now_api != api else None

        new_api = wait_for(standby, 60, "the standby leading")
        lab.env["SIGMA_SERVER"] = new_api
        watched = lab.ctl("rollout", "status", "rel", "-w", "--timeout", "180")
        assert watched.returncode == 0 and "rolled out" in watched.stdout, \
            watched.stdout + watched.stderr
        after = lab.running("rel", 4)
        assert all(i["generation"] == 2 for i in after), after
        assert {i["name"]: i["ip"] for i in after} == before
    finally:
        built.down()


def test_canary_waits_for_promote_and_pause_resume_keep_it(lab: LabCluster) -> None:
    spec = web(lab, "rel", 4, update={"canary": 1, "max_parallel": 2, "min_ready": "1s"})
    lab.apply(spec)
    try:
        lab.running("rel", 4)
        spec["containers"][0]["env"] = {"RELEASE": "2"}
        lab.apply(spec)
        watched = lab.ctl("rollout", "status", "rel", "-w", "--timeout", "120")
        assert watched.returncode == 0 and "canary of revision 2 is ready" in watched.stdout, \
            watched.stdout + watched.stderr
        assert sorted(i["generation"] for i in lab.instances("rel")) == [1, 1, 1, 2]
        paused = lab.ctl("rollout", "pause", "rel")
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
        assert lab.ctl("rollout", "status", "rel").returncode == 0  # paused by hand: no failure
        resumed = lab.ctl("rollout", "resume", "rel")
        assert resumed.returncode == 0 and "canary" in resumed.stdout, resumed.stderr
        time.sleep(3)  # a canary starts nothing more by itself
        assert sorted(i["generation"] for i in lab.instances("rel")) == [1, 1, 1, 2]
        promoted = lab.ctl("rollout", "promote", "rel")
        assert promoted.returncode == 0 and "promoted" in promoted.stdout, promoted.stderr
        done = lab.ctl("rollout", "status", "rel", "-w", "--timeout", "120")
        assert done.returncode == 0 and "revision 2 rolled out" in done.stdout, done.stdout
        assert [i["generation"] for i in lab.running("rel", 4)] == [2, 2, 2, 2]
        again = lab.ctl("rollout", "promote", "rel")
        assert again.returncode == 1 and "nothing to promote" in again.stderr, again.stderr
    finally:
        lab.delete("rel")
