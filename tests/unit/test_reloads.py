"""A mounted config's new version rolling out (sigmad.control.reloads) on plain records: the
batches, the readiness re-check after a reload, the failure, the revert and the halt; then
the whole loop on the fake store and engine (tests/unit/harness.py)."""

from __future__ import annotations

from sigmad.control import reloads
from sigmad.models import AppRecord, ContainerStatus, Instance, Termination, new_instance
from sigmad.reasons import State
from sigmad.spec import AppSpec, ConfigMount, ContainerSpec, ReadyCheck, UpdateSpec

T = 1000.0  # "now" of the pure tests


def app(replicas: int = 3, probe: bool = False, **update: object) -> AppRecord:
    ready = ReadyCheck(tcp=8080) if probe else None
    spec = AppSpec(app="web", replicas=replicas,
                   containers=[ContainerSpec(name="main", image="img", ready=ready)],
                   configs=[ConfigMount("conf", "/etc/conf", on_change="signal:SIGHUP")],
                   update=UpdateSpec(**update))  # type: ignore[arg-type]
    return AppRecord(spec, configs={"conf": 2})


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
    assert p.pins == {insts[1].key}
    # restarted after the signal: no check passes
    insts[0].terminations = [Termination("main", "Exited(1)", T - 1)]
    p = reloads.plan(rec, insts, T + 3.5)
    assert not p.checked and p.watching


def test_with_a_probe_a_reload_counts_once_the_probe_passed_again() -> None:
    rec = app(probe=True, min_ready=30)
    insts = running(rec, 2)
    reloaded(insts[0], T - 1, State.STARTING)  # the Runner re-probes after the signal
    p = reloads.plan(rec, insts, T)
    assert not p.checked and p.pins == set() and p.watching
    reloaded(insts[0], T - 1, State.RUNNING)  # a probe passed: min_ready is not waited for
    p = reloads.plan(rec, insts, T)
    assert list(p.checked) == [insts[0].key] and p.pins == {insts[1].key}
