"""A mounted config's new version rolling out (sigmad.control.reloads) on plain records: the
batches, the readiness re-check after a reload, the failure, the revert and the halt; then
the whole loop on the fake store and engine (tests/unit/harness.py)."""

from __future__ import annotations

import asyncio

import pytest

from sigmad.control import drive, reloads
from sigmad.models import AppRecord, ContainerStatus, Instance, Termination, new_instance
from sigmad.reasons import State
from sigmad.spec import AppSpec, ConfigMount, ContainerSpec, ReadyCheck, UpdateSpec
from tests.unit.harness import Leader, call
from tests.unit.test_configs import configured, held, new_version

T = 1000.0  # "now" of the pure tests


def app(replicas: int = 3, probe: bool = False, **update: object) -> AppRecord:
    ready = ReadyCheck(tcp=8080) if probe else None
    spec = AppSpec(app="web", replicas=replicas,
                   containers=[ContainerSpec(name="main", image="img", ready=ready)],
                   configs=[ConfigMount("conf", "/etc/conf", on_change="signal:SIGHUP")],
                   update=UpdateSpec(**update))  # type: ignore[arg-type]
    return AppRecord(spec, configs={"conf": 2}, configs_from={"conf": 1})


def running(rec: AppRecord, n: int, version: int = 1) -> list[Instance]:
    out = []
    for i in range(n):
        inst = new_instance(rec.spec, i, 1, {"conf": version})
        inst.node, inst.state, inst.configs_have = "a", State.RUNNING, {"conf": version}
        inst.containers = [ContainerStatus("main", f"c{i}", "running", ready=True)]
        out.append(inst)
    return out


def reloaded(inst: Instance, at: float, state: State = State.RUNNING) -> None:
    """`inst` took v2 by a signal at `at`."""
    inst.configs = inst.configs_have = {"conf": 2}
    inst.reloaded_at, inst.state = at, state
    inst.containers[0].ready = state == State.RUNNING


def test_a_config_version_reaches_serving_instances_in_batches_of_max_parallel() -> None:
    """Of 8 Running instances at 25 %, 2 take v2 at a time; one that serves nothing takes it
    at once; an instance on v2 not yet settled holds its place."""
    rec = app(replicas=8, max_parallel=25, percent=True)
    insts = running(rec, 8)
    insts[5].state = State.EXITED  # serves nothing
    assert reloads.plan(rec, insts, T).pins == {insts[0].key, insts[1].key, insts[5].key}
    insts[0].configs = {"conf": 2}  # re-pinned, its containers still on v1: busy
    assert reloads.plan(rec, insts, T).pins == {insts[1].key, insts[5].key}
    insts[0].configs_have = {"conf": 2}  # settled (on_change none: nothing to check)
    assert reloads.plan(rec, insts, T).pins == {insts[1].key, insts[2].key, insts[5].key}
    assert reloads.plan(None, insts, T).pins == set()


def test_without_a_probe_a_reload_counts_after_min_ready_running() -> None:
    rec = app(min_ready=5)
    insts = running(rec, 3)
    reloaded(insts[0], T - 2)
    p = reloads.plan(rec, insts, T)
    assert p.pins == set() and p.watching and not p.checked  # web-0 holds the one place
    p = reloads.plan(rec, insts, T + 3.5)
    assert p.checked == {insts[0].key: "ready again after taking configs conf v2"}
    assert p.pins == set() and p.app is None  # the next once web-0's record says so
    insts[0].reloaded_at = 0.0
    assert reloads.plan(rec, insts, T + 3.5).pins == {insts[1].key}
    insts[0].reloaded_at = T - 2
    # restarted after the signal: no check passes, and the rollout fails
    insts[0].terminations = [Termination("main", "Exited(1)", T - 1)]
    p = reloads.plan(rec, insts, T + 3.5)
    assert not p.checked and p.failed is insts[0]


def test_with_a_probe_a_reload_counts_once_the_probe_passed_again() -> None:
    rec = app(probe=True, min_ready=30)
    insts = running(rec, 2)
    reloaded(insts[0], T - 1, State.STARTING)  # the Runner re-probes after the signal
    p = reloads.plan(rec, insts, T)
    assert not p.checked and p.pins == set() and p.watching
    reloaded(insts[0], T - 1, State.RUNNING)  # a probe passed: min_ready is not waited for
    p = reloads.plan(rec, insts, T)
    assert list(p.checked) == [insts[0].key] and p.pins == set()


def test_a_reload_not_ready_within_the_deadline_reverts_the_rollout() -> None:
    rec = app(probe=True, progress_deadline=20)
    insts = running(rec, 3)
    reloaded(insts[0], T - 25, State.STARTING)
    insts[0].reason = "waiting for main to be ready again after its config reload"
    p = reloads.plan(rec, insts, T)
    assert p.failed is insts[0] and p.pins == set() and p.app is not None
    assert p.app.configs == {"conf": 1} and p.app.configs_from == {"conf": 1}
    assert p.app.generation == rec.generation + 1
    assert p.app.configs_halt == (
        "configs conf v1 → v2 failed on instance web-0: not ready again within 20s of its "
        "reload (Starting: waiting for main to be ready again after its config reload); "
        "reverted to conf v1")
    # The revert: web-0 goes back first (one place), nothing is checked for failure again.
    p = reloads.plan(p.app, insts, T + 100)
    assert p.app is None and p.pins == {insts[0].key}
    assert reloads.status(rec, insts) == "rolling"


def test_a_crash_after_the_reload_fails_it_at_once_and_without_auto_revert_it_stops() -> None:
    rec = app(auto_revert=False)
    insts = running(rec, 3)
    reloaded(insts[0], T - 1, State.FAILED)
    insts[0].reason = "restarting in 1s"
    insts[2].state = State.PENDING  # serves nothing
    p = reloads.plan(rec, insts, T)
    assert p.app is not None and p.app.configs == {"conf": 2}
    assert p.app.configs_halt.startswith("configs conf v1 → v2 failed on instance web-0: "
                                         "Failed: restarting in 1s; the rollout stopped "
                                         "(update.auto_revert is off)")
    p = reloads.plan(p.app, insts, T + 1)  # stopped: only what serves nothing moves on
    assert p.app is None and p.pins == {insts[2].key}
    halted = reloads.halted(rec, insts[0], "x", T)
    assert reloads.status(halted, insts) == "stopped"


def test_status_and_what_the_next_record_carries() -> None:
    rec = app()
    insts = running(rec, 2, version=2)
    assert reloads.status(rec, insts) == "done"
    reverted = reloads.halted(AppRecord(rec.spec, configs={"conf": 2}, configs_from={
        "conf": 1}), insts[0], "x", T)
    assert reloads.status(reverted, insts) == "reverting"
    assert reloads.status(reverted, running(rec, 2, version=1)) == "reverted"
    # a new version: reverts to what the instances had, and clears the halt
    assert reloads.carried(reverted, {"conf": 3}, [{"conf": 1}] * 2) == ({"conf": 1}, "")
    # unchanged versions (a scale): the halt and the way back stay
    assert reloads.carried(reverted, {"conf": 1}, []) == ({"conf": 1}, reverted.configs_halt)
    # a new version while one still rolls out: back to where that one came from
    assert reloads.carried(rec, {"conf": 3}, [{"conf": 2}, {"conf": 1}]) == ({"conf": 1}, "")
    assert reloads.carried(rec, {"conf": 3}, [{"conf": 2}] * 2) == ({"conf": 2}, "")


# -- on the fake store and engine ------------------------------------------------------------


async def test_a_version_whose_reload_never_gets_ready_again_is_reverted() -> None:
    """web-0 takes v2 (SIGHUP), its probe fails from then on: it is Starting (not ready
    again), the deadline passes, the app pins v1 again and says why; web-1 never takes v2;
    web-0 is pinned back to v1 and, its probe passing again, settles on it."""
    async with Leader() as lead, lead.client() as client:
        await lead.add_node("a")
        await new_version(client, "one")
        text = configured(replicas=2, update="{progress_deadline: 1}").replace(
            "    image: img\n", "    image: img\n    ready: {tcp: 8080}\n")
        await call(client, "PUT", "/v1/apps", text)
        await lead.until(lambda: len(lead.instances("web")) == 2)
        for i in lead.instances("web"):
            await held(lead, "a", i.key, {"web-conf": 1})
        await lead.running("web", 2)
        await new_version(client, "two")
        await lead.until(lambda: lead.instances("web")[0].configs == {"web-conf": 2})
        lead.engine("a").probe["main"] = 10 ** 6  # v2 breaks it
        web0 = lead.instances("web")[0]
        await held(lead, "a", web0.key, {"web-conf": 2})
        await lead.until(lambda: lead.instances("web")[0].reason ==
                         "waiting for main to be ready again after its config reload")
        rec = lambda: lead.cache.app("default/web").value  # type: ignore[union-attr]  # noqa: E731
        await lead.until(lambda: rec().configs == {"web-conf": 1}, timeout=10)
        assert rec().configs_halt.startswith("configs web-conf v1 → v2 failed on instance "
                                             "web-0: not ready again within 1s")
        assert lead.instances("web")[1].configs == {"web-conf": 1}  # never took v2
        await lead.until(lambda: lead.instances("web")[0].configs == {"web-conf": 1})
        lead.engine("a").probe["main"] = 0
        await held(lead, "a", web0.key, {"web-conf": 1})
        await lead.until(lambda: all(i.configs_have == {"web-conf": 1} and not i.reloaded_at
                                     and i.state == State.RUNNING
                                     for i in lead.instances("web")), timeout=10)
        status, found = await call(client, "GET", "/v1/configs/default/web-conf")
        assert status == 200 and found["rollouts"] == [{
            "app": "default/web", "version": 1, "from": 1, "state": "reverted",
            "reason": rec().configs_halt}]


async def test_no_probe_counts_within_the_grace_after_the_signal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after its SIGHUP an instance is Starting and its probe is not run (it would
    see the app before it acted on the signal), however often it is stepped; once the
    grace is over, a passing probe makes it Running again and its reload is checked."""
    monkeypatch.setattr(drive, "RELOAD_GRACE", 3600.0)
    async with Leader() as lead, lead.client() as client:
        await lead.add_node("a")
        await new_version(client, "one")
        text = configured(replicas=1).replace("    image: img\n",
                                              "    image: img\n    ready: {tcp: 8080}\n")
        await call(client, "PUT", "/v1/apps", text)
        await lead.until(lambda: len(lead.instances("web")) == 1)
        key = lead.instances("web")[0].key
        await held(lead, "a", key, {"web-conf": 1})
        await lead.running("web", 1)
        await new_version(client, "two")
        await held(lead, "a", key, {"web-conf": 2})
        await lead.until(lambda: lead.instances("web")[0].reloaded_at > 0)
        execs = sum(1 for c in lead.engine("a").calls if c[0] == "exec")
        await asyncio.sleep(1.5)  # three steps at least (STEP_AGAIN), and the kill's event
        (inst,) = lead.instances("web")
        assert inst.state == State.STARTING and inst.reason == \
            "waiting for main to be ready again after its config reload"
        assert sum(1 for c in lead.engine("a").calls if c[0] == "exec") == execs
        monkeypatch.setattr(drive, "RELOAD_GRACE", 0.0)
        await lead.until(lambda: lead.instances("web")[0].state == State.RUNNING and
                         not lead.instances("web")[0].reloaded_at)
