"""At most one live copy (DESIGN.md §6) on the lab, with real dockerd: whatever breaks on a
host, a sampler lists every engine's running sigma containers every 100 ms and no sample
ever has two running holders of one instance or one IP.

- (a) only the agent is killed (its dockerd and containers live on): the master stops the
  old copy through the host's engine before it starts the new one;
- (b) the host's link is cut: its agent cannot renew its lease and stops its containers
  itself before the lease lapses; the master, which cannot reach that engine either (the
  lab's engines are reached over the underlay, with TLS), moves the instance once the lease
  has lapsed plus the grace: so this is the self-fence's test end to end;
- (c) dockerd is frozen (SIGSTOP): nothing can stop the copy it runs, and the agent, alive,
  says so, so the right outcome is that the instance is NOT moved: it keeps serving from its
  host (its container runs on), its node is NotReady (nothing new lands there), and once the
  engine answers again it is Running there as before.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.labkit import Holders, LabCluster
from tests.integration.test_faults import moved_and_reachable, node_ready, one_per_host

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def instance(lab: LabCluster, index: int) -> dict[str, Any]:
    return next(i for i in lab.instances("svc") if i["index"] == index)


def check_one_holder(holders: Holders) -> None:
    """No sample had two running holders of one instance or one IP."""
    doubles = holders.doubles()
    assert not doubles, "\n".join(doubles[:20])
    samples = holders.samples
    print(f"{len(samples)} samples over {samples[-1].at:.1f}s, "
          f"{sum(1 for s in samples if s.silent)} with a silent engine: none with two holders")


def nodes_holding(holders: Holders, owner: str) -> list[str]:
    """The node holding `owner` in each sample where one does, in order."""
    return [h[0].node for h in holders.holders_of(owner) if h]


def test_a_killed_agent_s_copy_is_stopped_through_its_engine_before_the_move(
        lab: LabCluster) -> None:
    client, by_node = one_per_host(lab)
    lost = by_node["h2"]
    owner = f"default/svc-{lost['index']}"
    agent = lab.lab.host("h2").agent_pid
    try:
        with Holders(lab.lab.engines) as holders:
            start = time.monotonic()
            os.kill(agent, signal.SIGKILL)  # dockerd lives on
            took = moved_and_reachable(lab, client, lost, start)
            print(f"agent killed: svc-{lost['index']} reachable again after {took:.1f}s")
            check_one_holder(holders)  # up to the move (on main: two holders from here on)
            moved = instance(lab, lost["index"])
            assert moved["terminations"][-1]["reason"] == "KilledBySigma(fenced)", moved
            assert lab.docker("h2", "ps", "-q", "--filter", "label=sigma.app=svc").stdout == ""
            lab.lab.restart_agent("h2")
            wait_for(lambda: node_ready(lab, "h2"), 30, "h2 Ready again")
            assert lab.docker("h2", "ps", "-aq", "--filter", "label=sigma.app=svc").stdout == ""
        check_one_holder(holders)
        seen = nodes_holding(holders, owner)
        assert seen[0] == "h2" and seen[-1] != "h2", seen
        events = lab.ctl("events", "--app", "svc").stdout
        assert "fenced: 1 container(s) stopped on h2 through its engine" in events, events
    finally:
        if lab.lab.host("h2").agent_pid == agent:  # not restarted yet
            lab.lab.restart_agent("h2")
        lab.delete("svc")
        lab.delete("client")


def test_a_cut_off_host_fences_itself_before_its_lease_lapses(lab: LabCluster) -> None:
    client, by_node = one_per_host(lab)
    lost = by_node["h2"]
    owner = f"default/svc-{lost['index']}"
    log = Path(lab.lab.host("h2").root) / "node.log"

    def fences() -> list[str]:
        return [line for line in log.read_text().splitlines() if "self-fence: stopped" in line]

    before = len(fences())
    try:
        with Holders(lab.lab.engines) as holders:
            start = time.monotonic()
            lab.lab.partition("h2")
            took = moved_and_reachable(lab, client, lost, start)
            print(f"link cut: svc-{lost['index']} reachable on its IP again after {took:.1f}s")
            check_one_holder(holders)  # up to the move (on main: two holders from here on)
            # the agent stopped its containers itself, before its lease could lapse
            fenced = wait_for(lambda: fences()[before:], 10, "the agent's self-fence")
            print(fenced[-1])
            assert lab.docker("h2", "ps", "-q", "--filter", "label=sigma.app=svc").stdout == ""
            lab.lab.heal("h2")
            wait_for(lambda: node_ready(lab, "h2"), 30, "h2 Ready again")
            assert lab.docker("h2", "ps", "-aq", "--filter", "label=sigma.app=svc").stdout == ""
        check_one_holder(holders)
        seen = nodes_holding(holders, owner)
        assert seen[0] == "h2" and seen[-1] != "h2", seen
        assert lab.fetch(client, lost["ip"]).strip() == f"hello from svc-{lost['index']}"
    finally:
        lab.lab.heal("h2")
        lab.delete("svc")
        lab.delete("client")


def test_a_frozen_engine_s_instance_stays_put_until_it_answers(lab: LabCluster) -> None:
    client, by_node = one_per_host(lab)
    lost = by_node["h3"]
    owner = f"default/svc-{lost['index']}"
    dockerd = lab.lab.host("h3").dockerd_pid
    try:
        with Holders(lab.lab.engines) as holders:
            os.kill(dockerd, signal.SIGSTOP)  # the engine hangs; its containers keep running
            wait_for(lambda: instance(lab, lost["index"])["state"] != "Running", 30,
                     "h3's instance no longer Running")
            # Past when a lapsed lease (2 s) plus the grace (5 s) would have fenced it:
            time.sleep(8)
            check_one_holder(holders)  # (on main: moved, two holders)
            now = instance(lab, lost["index"])
            assert "its agent is alive" in now["reason"], now
            assert not node_ready(lab, "h3")
            assert now["state"] == "NeedMigration" and now["node"] == "h3", now
            # ... and it still serves, from the frozen host's running container
            assert lab.fetch(client, lost["ip"]).strip() == f"hello from svc-{lost['index']}"
            os.kill(dockerd, signal.SIGCONT)
            wait_for(lambda: node_ready(lab, "h3"), 30, "h3 Ready once its engine answers")

            def back() -> dict[str, Any] | None:
                now = instance(lab, lost["index"])
                return now if now["state"] == "Running" else None

            after = wait_for(back, 30, "Running again")
            assert after["node"] == "h3" and after["ip"] == lost["ip"]
            assert after["containers"][0]["id"] == lost["containers"][0]["id"]  # the same one
        check_one_holder(holders)
        assert set(nodes_holding(holders, owner)) == {"h3"}
        each = holders.holders_of(owner)
        first = next(n for n, h in enumerate(each) if h)
        assert all(each[first:]), "the copy stopped running at some point"  # it kept serving
        assert any(s.silent == ["h3"] for s in holders.samples)  # it was sampled frozen
    finally:
        os.kill(dockerd, signal.SIGCONT)
        lab.delete("svc")
        lab.delete("client")
