"""The rollout decisions (sigmad/control/rollout.py): batch bounds, canary, failure → revert
or pause, step kinds (move / recreate / reload), revision pruning."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sigmactl.client import CtlError
from sigmactl.rollout import diff_text, failed, history_text, kept, progress_text
from sigmad import records
from sigmad.api import make_app
from sigmad.api.apps import only_replicas
from sigmad.control.rollout import (
    KEEP_REVISIONS,
    InstanceView,
    Phase,
    Revision,
    Rollout,
    app_at,
    batch_size,
    plan,
    prune,
    step_kind,
)
from sigmad.engine import EnginePool
from sigmad.errors import SpecError
from sigmad.models import AppRecord
from sigmad.spec import (
    AppSpec,
    ContainerSpec,
    NetworkSpec,
    Port,
    UpdateSpec,
    VolumeSpec,
    parse,
    update_spec,
)
from sigmad.state.cache import APPS, ROLLOUTS
from tests.unit.harness import TOKEN, Leader, call, spec


def app(image: str = "busybox:1", **kw: object) -> AppSpec:
    return AppSpec(app="web", containers=[ContainerSpec(name="c", image=image)], **kw)  # type: ignore[arg-type]


BACK = Revision(1, app(), {"conf": 1})  # revision 1, still kept


def at(policy: UpdateSpec, replicas: int = 2) -> AppRecord:
    """The app on revision 2 (image busybox:2) with `policy`."""
    return AppRecord(app("busybox:2", update=policy, replicas=replicas), 5, 2, 1.0, 1.0)


def views(revs: list[int], busy: tuple[int, ...] = (), failing: dict[int, str] | None = None
          ) -> list[InstanceView]:
    failing = failing or {}
    return [InstanceView(i, r, ready=i not in busy and i not in failing,
                         in_transition=i in busy, since=1.0, failing=failing.get(i, ""))
            for i, r in enumerate(revs)]


def run(policy: UpdateSpec, replicas: int, fail_on: int = 0) -> tuple[Rollout, int]:
    """Drive `plan` to its end as an executor would (each started step finishes next pass,
    failing if the instance index is `fail_on` - 1); return the final record and the most
    instances ever in transition at once."""
    revs, busy, failing = [1] * replicas, set[int](), dict[int, str]()
    r, most = Rollout(1, 2), 0
    for _ in range(200):
        p = plan(r, views(revs, tuple(busy), failing), at(policy, replicas), BACK, now=2.0)
        r = p.rollout
        for i in list(busy):  # last pass's steps end
            busy.discard(i)
            if fail_on and i == fail_on - 1 and revs[i] == 2:
                failing[i] = "crash-looping"
        if r.phase == Phase.REVERTING:
            failing.clear()
        target = 1 if r.phase == Phase.REVERTING else 2
        for i in p.start:
            revs[i], _ = target, busy.add(i)
        most = max(most, len(busy))
        if r.phase in (Phase.DONE, Phase.REVERTED, Phase.PAUSED, Phase.CANARY):
            return r, most
    raise AssertionError("the rollout never ended")


def revisions(lead: Leader) -> list[int]:
    prefix = lead.store.keys.revisions("default", "web")
    return sorted(int(k.removeprefix(prefix)) for k in lead.store.data if k.startswith(prefix))


def test_batch_size_counts_and_percentages() -> None:
    assert batch_size(UpdateSpec(), 6) == 1
    assert batch_size(UpdateSpec(max_parallel=25, percent=True), 30) == 7
    assert batch_size(UpdateSpec(max_parallel=25, percent=True), 2) == 1


def test_a_good_release_never_exceeds_max_parallel_and_ends_done() -> None:
    for n, policy in ((6, UpdateSpec()), (6, UpdateSpec(max_parallel=2)),
                      (30, UpdateSpec(max_parallel=25, percent=True))):
        r, most = run(policy, n)
        assert r.phase == Phase.DONE and r.done == list(range(n))
        assert most == batch_size(policy, n)


def test_a_failing_instance_reverts_with_auto_revert() -> None:
    r, _ = run(UpdateSpec(max_parallel=2), 6, fail_on=2)
    assert r.phase == Phase.REVERTED and r.done == list(range(6))
    assert "instance 1 on revision 2: crash-looping" in r.reason


def test_a_failing_instance_pauses_without_auto_revert() -> None:
    r, _ = run(UpdateSpec(auto_revert=False), 6, fail_on=1)
    assert r.phase == Phase.PAUSED and "crash-looping" in r.reason


def test_not_ready_within_the_deadline_fails() -> None:
    inst = [InstanceView(0, 2, ready=False, in_transition=True, since=1.0),
            InstanceView(1, 1, ready=True, in_transition=False)]
    p = plan(Rollout(1, 2), inst, at(UpdateSpec(progress_deadline=5)), BACK, now=7.0)
    assert p.rollout.phase == Phase.REVERTING and "not ready within 5s" in p.rollout.reason
    p = plan(Rollout(1, 2), inst, at(UpdateSpec(progress_deadline=5)), BACK, now=5.0)
    assert p.rollout.phase == Phase.RUNNING and not p.revert


def test_a_failure_plans_the_revert_with_the_app_record_to_write() -> None:
    failing = views([2, 1, 1], failing={0: "crash-looping"})
    p = plan(Rollout(1, 2), failing, at(UpdateSpec(max_parallel=2), 3), BACK, now=9.0)
    assert p.rollout.phase == Phase.REVERTING and p.revert == 1 and p.start == []
    assert p.app == AppRecord(app(update=UpdateSpec(max_parallel=2), replicas=3),
                              generation=6, template_generation=1, created=1.0, updated=9.0,
                              configs={"conf": 1})
    gone = plan(Rollout(1, 2), failing, at(UpdateSpec()), None, now=9.0)
    assert gone.rollout.phase == Phase.PAUSED and (gone.revert, gone.app) == (0, None)
    assert gone.rollout.reason == "instance 0 on revision 2: crash-looping; revision 1 is " \
        "no longer kept: cannot revert"
    off = plan(Rollout(1, 2), failing, at(UpdateSpec(auto_revert=False)), BACK, now=9.0)
    assert off.rollout.phase == Phase.PAUSED and (off.revert, off.app) == (0, None)
    # a revert that fails pauses: it never reverts the revert
    back = plan(Rollout(1, 2, Phase.REVERTING, reason="r"), views([1, 2, 2], failing={0: "x"}),
                at(UpdateSpec()), BACK, now=9.0)
    assert back.rollout.phase == Phase.PAUSED and (back.revert, back.app) == (0, None)
    assert back.rollout.reason.startswith("the revert failed: instance 0 on revision 1: x")
    # nothing failing: no revert
    assert plan(Rollout(1, 2), views([2, 1, 1]), at(UpdateSpec()), BACK, now=9.0).app is None


def test_app_at_is_the_revision_with_the_apps_replicas_and_policy_now() -> None:
    now = at(UpdateSpec(canary=1), 4)
    rec = app_at(Revision(3, app("busybox:3", replicas=9), {"conf": 2}), now, 7, 8.0)
    assert rec.spec == app("busybox:3", replicas=4, update=UpdateSpec(canary=1))
    assert (rec.generation, rec.template_generation, rec.created, rec.updated, rec.configs) \
        == (7, 3, 1.0, 8.0, {"conf": 2})


def test_canary_waits_for_promote_then_finishes() -> None:
    policy = UpdateSpec(max_parallel=3, canary=2)
    r, most = run(policy, 6)
    assert r.phase == Phase.CANARY and r.done == [0, 1] and most == 2
    promoted = dataclasses.replace(r, phase=Phase.RUNNING, promoted=True)
    p = plan(promoted, views([2, 2, 1, 1, 1, 1]), at(policy, 6), BACK, now=2.0)
    assert p.start == [2, 3, 4]
    r, _ = run(dataclasses.replace(policy, auto_promote=True), 6)
    assert r.phase == Phase.DONE


def test_paused_rollout_starts_nothing() -> None:
    p = plan(Rollout(1, 2, Phase.PAUSED), views([1] * 4), at(UpdateSpec()), BACK, now=2.0)
    assert p.start == [] and p.rollout.phase == Phase.PAUSED


def test_resume_from_the_record_carries_on_where_it_was() -> None:
    # a new leader sees 2 done, one in flight: it starts only the room left
    p = plan(Rollout(1, 2), views([2, 2, 2, 1, 1, 1], busy=(2,)),
             at(UpdateSpec(max_parallel=2), 6), BACK, now=2.0)
    assert p.rollout.done == [0, 1] and p.start == [3]


def test_step_kind() -> None:
    a = Revision(1, app())
    assert step_kind(a, Revision(2, app("busybox:2")), app()) == "move"
    assert step_kind(a, Revision(2, app(), {"nginx": 3}), app()) == "reload"
    with_port = app(network=NetworkSpec(ports=[Port("http", 80)]))
    assert step_kind(a, Revision(2, app("busybox:2")), with_port) == "recreate"
    with_ssd = app(volumes=[VolumeSpec("data", "/data")])
    assert step_kind(a, Revision(2, app("busybox:2")), with_ssd) == "recreate"
    assert step_kind(a, Revision(2, app(), {"nginx": 3}), with_ssd) == "reload"


def test_prune_keeps_the_last_twenty_and_the_current() -> None:
    revs = list(range(1, 31))
    assert prune(revs, 30) == list(range(1, 11))
    assert 3 not in prune(revs, 3) and len(prune(revs, 3)) == 30 - KEEP_REVISIONS - 1


def test_update_block_parses_and_bad_values_name_the_field() -> None:
    base = "app: a\nreplicas: 4\ncontainers: [{name: c, image: busybox}]\n"
    good = {"max_parallel": "25%", "canary": 1, "min_ready": "5s", "progress_deadline": "2m",
            "auto_promote": True}
    assert update_spec(good, 4) == UpdateSpec(25, True, 1, 5.0, 120.0, True, True)
    assert parse(base)[0].update == parse(base + "update: {}\n")[0].update == UpdateSpec()
    assert parse(base + "update: {max_parallel: 2}\n")[0].update.max_parallel == 2
    for bad, field in (("max_parallel: 0", "update.max_parallel"),
                       ("max_parallel: 101%", "update.max_parallel"),
                       ("max_parallel: true", "update.max_parallel"),
                       ("canary: 5", "update.canary"),
                       ("auto_revert: 'yes'", "update.auto_revert"),
                       ("min_ready: 10d", "update.min_ready"),
                       ("progress_deadline: 0s", "update.progress_deadline"),
                       ("surge: 1", "update.surge")):
        with pytest.raises(SpecError) as err:
            parse(base + "update: {" + bad + "}\n")
        assert err.value.field == field, (bad, err.value)


def test_an_old_record_without_update_reads_with_the_defaults() -> None:
    [s] = parse("app: a\ncontainers: [{name: c, image: busybox}]\n")
    raw = records.to_dict(AppRecord(s))
    del raw["spec"]["update"]
    assert records.from_dict(AppRecord, raw).spec.update == UpdateSpec()


def test_changing_only_the_update_policy_replaces_nothing() -> None:
    [a] = parse("app: a\ncontainers: [{name: c, image: busybox}]\n")
    b = dataclasses.replace(a, update=UpdateSpec(max_parallel=3))
    assert only_replicas(a, b)


async def test_apply_writes_a_revision_per_template_change() -> None:
    async with Leader() as lead:
        keys = lead.store.keys
        await lead.apply(spec(replicas=2))
        assert lead.store.value(keys.revision("default", "web", 1), Revision).n == 1
        await lead.apply(spec(replicas=3))  # scaling is no revision
        assert revisions(lead) == [1]
        await lead.apply(spec(replicas=3).replace("image: img", "image: img:2"))
        rev = lead.store.value(keys.revision("default", "web", 3), Revision)
        assert rev.spec.containers[0].image == "img:2" and rev.configs == {}


async def test_only_the_last_twenty_revisions_are_kept() -> None:
    async with Leader() as lead:
        for i in range(25):
            await lead.apply(spec(replicas=0).replace("image: img", f"image: img:{i}"))
        kept = revisions(lead)
        assert len(kept) == KEEP_REVISIONS and max(kept) == 25


async def test_the_api_and_sigmactl_show_the_history() -> None:
    lead = Leader()
    async with lead:
        server = make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine))
        client = TestClient(TestServer(server))
        await client.start_server()
        try:
            await lead.apply(spec(replicas=1))
            await lead.apply(spec(replicas=1).replace("image: img", "image: img:2"))
            status, answer = await call(client, "GET", "/v1/apps/default/web/rollout")
            assert status == 200 and answer["current"] == 2
            assert [r["images"] for r in answer["revisions"]] == [["img"], ["img:2"]]
            status, missing = await call(client, "GET", "/v1/apps/default/nope/rollout")
            assert status == 404 and "default/nope" in missing["error"]["message"]
        finally:
            await client.close()
    text = history_text(answer, now=answer["revisions"][-1]["created"])
    assert text.splitlines()[0].split() == ["REVISION", "AGE", "IMAGES", "CONFIGS", "NOTE"]
    assert text.splitlines()[2].split()[0] == "*2" and "img:2" in text.splitlines()[2]
    diff = diff_text(answer, "web", 1, 2).splitlines()
    assert diff[:4] == ["configs of revision 1: none", "configs of revision 2: none",
                        "--- revision 1", "+++ revision 2"], diff
    assert [x for x in diff[4:] if x[:1] in "+-"] == ["-  image: img", "+  image: img:2"], diff
    assert diff_text(answer, "web", 2, 2).endswith("the specs of revisions 2 and 2 are the same")
    with pytest.raises(CtlError) as err:
        diff_text(answer, "web", 1, 7)
    assert str(err.value).startswith("revision 7 is not kept by app web (kept: 1, 2)")
    with pytest.raises(CtlError, match="revisions 7 and 9 are not kept"):
        kept(answer, "web", 7, 9)


async def test_deleting_an_app_deletes_its_revisions_so_its_name_starts_afresh() -> None:
    async with Leader() as lead:
        await lead.apply(spec(replicas=0))
        await lead.apply(spec(replicas=0).replace("image: img", "image: img:2"))
        assert revisions(lead) == [1, 2]
        await lead.api.delete("default", "web")
        assert revisions(lead) == []
        await lead.apply(spec(replicas=0).replace("image: img", "image: img:3"))
        assert revisions(lead) == [1]


async def test_release_and_undo_make_new_revisions_and_refuse_bad_fields() -> None:
    lead = Leader()
    async with lead:
        server = make_app(lead.store, lead.cache, TOKEN, EnginePool("/t", factory=lead._engine))
        client = TestClient(TestServer(server))
        await client.start_server()
        base = "/v1/apps/default/web"
        try:
            await lead.apply(spec(replicas=1))
            status, answer = await call(client, "POST", base + "/release", {"image": "img:2"})
            assert status == 200 and answer["action"] == "updated", answer
            await lead.apply(spec(replicas=4).replace("image: img", "image: img:2"))  # scale
            assert revisions(lead) == [1, 2]
            for body, field in (({"image": "bad image"}, "image"), ({}, "image"),
                                ({"image": "x", "container": "nope"}, "container"),
                                ({"image": "x", "surge": 1}, "surge")):
                status, err = await call(client, "POST", base + "/release", body)
                assert (status, err["error"]["field"]) == (400, field), (body, err)
            for body, field in (({"to": 7}, "to"), ({"to": "1"}, "to"), ({"x": 1}, "x")):
                status, err = await call(client, "POST", base + "/undo", body)
                assert (status, err["error"]["field"]) == (400, field), (body, err)
            assert revisions(lead) == [1, 2]  # nothing written by a refused call
            status, answer = await call(client, "POST", base + "/undo", {})
            assert status == 200 and revisions(lead) == [1, 2, 4], answer
            app = lead.cache.get(APPS, lead.store.keys.app("default", "web")).value
            assert app.spec.containers[0].image == "img" and app.spec.replicas == 4
            status, answer = await call(client, "POST", base + "/undo", {"to": 2})
            assert status == 200 and revisions(lead) == [1, 2, 4, 5]
            app = lead.cache.get(APPS, lead.store.keys.app("default", "web")).value
            assert app.spec.containers[0].image == "img:2"
        finally:
            await client.close()


# -- the executor on the fakes (controller + fake engines + in-memory store) ------------------


def rolling(replicas: int, image: str, update: str = "{min_ready: 0s}") -> str:
    return spec(replicas=replicas, update=update).replace("image: img", f"image: {image}")


def record(lead: Leader) -> Rollout:
    found = lead.cache.get(ROLLOUTS, lead.store.keys.rollout("default", "web"))
    assert found is not None
    return found.value  # type: ignore[no-any-return]


async def two_nodes(lead: Leader, images: set[str]) -> None:
    for name in ("a", "b"):
        await lead.add_node(name)
        lead.engine(name).images |= images


async def test_a_release_moves_instances_live_never_more_than_max_parallel() -> None:
    async with Leader() as lead:
        await two_nodes(lead, {"img:2"})
        await lead.apply(rolling(4, "img", "{max_parallel: 2, min_ready: 0s}"))
        before = {i.name: i.ip for i in await lead.running("web", 4)}
        most = 0

        def sample() -> None:
            nonlocal most
            most = max(most, sum(1 for i in lead.instances() if i.release or i.move))

        lead.cache.subscribe(lambda *_: sample())
        await lead.apply(rolling(4, "img:2", "{max_parallel: 2, min_ready: 0s}"))
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "the rollout done")
        after = lead.instances()
        assert all(i.generation == 2 and i.state == "Running" and not i.release for i in after)
        assert {i.name: i.ip for i in after} == before  # fixed IPs, moved live
        assert 1 <= most <= 2
        assert record(lead).done == [0, 1, 2, 3]
        moved = [e for e in lead.events() if "release to revision 2: moves live" in e]
        assert len(moved) == 4, lead.events()


async def test_a_broken_image_fails_the_rollout_and_reverts_by_itself() -> None:
    async with Leader() as lead:
        await two_nodes(lead, set())
        await lead.apply(rolling(3, "img"))
        await lead.running("web", 3)
        await lead.apply(rolling(3, "img:missing"))
        await lead.until(lambda: record(lead).phase == Phase.REVERTED, 15, "reverted")
        r = record(lead)
        assert "img:missing" in r.reason and r.from_revision == 1 and r.to_revision == 2
        app = lead.cache.app("default/web").value  # type: ignore[union-attr]
        assert app.template_generation == 1 and app.spec.containers[0].image == "img"
        insts = await lead.running("web", 3)
        assert all(i.generation == 1 for i in insts)
        # the failed step is cleared in the pass that recorded the revert, after the record
        await lead.until(lambda: not any(i.release for i in lead.instances()), 5,
                         "the failed step cleared")
        # only the first instance was ever tried: the others never left revision 1
        assert all(not any(t.reason == "KilledBySigma(migrated)" for t in i.terminations)
                   for i in insts), "\n".join(lead.events())


async def test_a_crashing_new_copy_pauses_without_auto_revert_and_resume_retries() -> None:
    lead = Leader()
    async with lead, lead.client() as client:
        await two_nodes(lead, {"img:2"})
        policy = "{min_ready: 1s, auto_revert: false}"  # (the crash comes before the flip)
        await lead.apply(rolling(2, "img", policy))
        await lead.running("web", 2)
        for name in ("a", "b"):
            lead.engine(name).script["main"] = 1  # every new container exits at once
        await lead.apply(rolling(2, "img:2", policy))
        await lead.until(lambda: record(lead).phase == Phase.PAUSED, 15, "paused")
        assert "ended" in record(lead).reason
        assert all(i.generation == 1 and i.state == "Running" for i in lead.instances()), \
            "\n".join(lead.events())
        await lead.until(lambda: not any(i.release for i in lead.instances()), 5,
                         "the failed step cleared")
        for name in ("a", "b"):
            lead.engine(name).script.clear()
        status, answer = await call(client, "POST", "/v1/apps/default/web/rollout/resume")
        assert status == 200 and answer["phase"] == "running", answer
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "done after resume")
        status, err = await call(client, "POST", "/v1/apps/default/web/rollout/resume")
        assert status == 409 and "nothing to resume" in err["error"]["message"]
        status, err = await call(client, "POST", "/v1/apps/default/web/rollout/jump")
        assert status == 400 and err["error"]["field"] == "action"
        assert "pause, resume, promote or restart" in err["error"]["message"]


async def test_canary_pauses_until_promote() -> None:
    lead = Leader()
    async with lead, lead.client() as client:
        await two_nodes(lead, {"img:2"})
        policy = "{canary: 1, max_parallel: 2, min_ready: 0s}"
        await lead.apply(rolling(3, "img", policy))
        await lead.running("web", 3)
        await lead.apply(rolling(3, "img:2", policy))
        await lead.until(lambda: record(lead).phase == Phase.CANARY, 15, "canary")
        assert sorted(i.generation for i in lead.instances()) == [1, 1, 2]
        status, _ = await call(client, "POST", "/v1/apps/default/web/rollout/promote")
        assert status == 200
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "done after promote")
        assert [i.generation for i in lead.instances()] == [2, 2, 2]


async def test_a_new_leader_carries_on_from_the_record() -> None:
    lead = Leader()
    async with lead:
        await two_nodes(lead, {"img:2"})
        await lead.apply(rolling(3, "img", "{min_ready: 0s}"))
        await lead.running("web", 3)
        await lead.controller_stop()
        await lead.apply(rolling(3, "img:2", "{min_ready: 0s}"))
        assert record(lead).phase == Phase.RUNNING  # written by apply, nobody executes it
        assert all(i.generation == 1 for i in lead.instances())
        await lead.controller_start()
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "done by the new one")
        assert all(i.generation == 2 for i in lead.instances())


async def test_an_app_with_host_ports_stops_then_starts_and_says_so() -> None:
    async with Leader() as lead:
        await two_nodes(lead, {"img:2"})
        ports = "{ports: [{name: http, container: 8080}]}"
        await lead.apply(spec(replicas=2, network=ports, update="{min_ready: 0s}"))
        await lead.running("web", 2)
        await lead.apply(spec(replicas=2, network=ports, update="{min_ready: 0s}")
                         .replace("image: img", "image: img:2"))
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "done")
        assert "host ports" in record(lead).recreate_reason
        assert any("without live moves" in e for e in lead.events())


async def test_restart_moves_every_instance_live_as_a_new_revision_and_refuses_a_second() -> None:
    lead = Leader()
    async with lead, lead.client() as client:
        await two_nodes(lead, set())
        await lead.apply(rolling(3, "img", "{max_parallel: 2, min_ready: 0s}"))
        before = {i.name: (i.ip, i.node, i.containers[0].id)
                  for i in await lead.running("web", 3)}
        base = "/v1/apps/default/web/rollout"
        status, answer = await call(client, "POST", base + "/restart")
        assert status == 200 and (answer["from_revision"], answer["to_revision"]) == (1, 2)
        status, err = await call(client, "POST", base + "/restart")  # under way: refused
        assert status == 409 and "restart once it has ended" in err["error"]["message"], err
        assert revisions(lead) == [1, 2]  # nothing written by the refused call
        await lead.until(lambda: record(lead).phase == Phase.DONE, 15, "the restart done")
        after = {i.name: i for i in await lead.running("web", 3)}
        assert all(i.generation == 2 for i in after.values())
        assert {n: i.ip for n, i in after.items()} == {n: ip for n, (ip, _, _) in before.items()}
        assert all(after[n].node != node and after[n].containers[0].id != cid
                   for n, (_, node, cid) in before.items())  # each moved live, made anew
        app = lead.cache.app("default/web").value  # type: ignore[union-attr]
        old = lead.store.value(lead.store.keys.revision("default", "web", 1), Revision)
        new = lead.store.value(lead.store.keys.revision("default", "web", 2), Revision)
        assert new.restart and not old.restart and new.spec == old.spec == app.spec
        assert new.configs == old.configs
        status, answer = await call(client, "GET", base)
        status, again = await call(client, "POST", base + "/restart")  # ended: allowed
        assert status == 200 and again["to_revision"] == 3, again
        status, err = await call(client, "POST", "/v1/apps/default/nope/rollout/restart")
        assert status == 404
    text = history_text(answer, now=answer["revisions"][-1]["created"])
    assert text.splitlines()[0].split() == ["REVISION", "AGE", "IMAGES", "CONFIGS", "NOTE"]
    assert text.splitlines()[1].split()[-1] == "-"
    assert text.splitlines()[2].split()[0] == "*2" and text.splitlines()[2].endswith("restart")


def test_status_text_counts_and_says_when_a_rollout_failed() -> None:
    insts = [{"name": f"web-{i}", "revision": 2 if i < 3 else 1, "ready": i != 2,
              "release": 2 if i == 2 else 0, "moving": i == 2, "failing": ""}
             for i in range(6)]
    answer = {"current": 2, "instances": insts,
              "rollout": {"from_revision": 1, "to_revision": 2, "phase": "running"}}
    text = progress_text(answer)
    assert text.startswith("[######..............] 3/6 on revision 2, 2 ready, 1 moving, "
                           "0 failing; running"), text
    assert not failed(answer)
    reverted = {**answer, "rollout": {**answer["rollout"], "phase": "reverted",
                                      "reason": "instance 0 on revision 2: x"}}
    assert failed(reverted) and "6/6" not in progress_text(reverted)
    paused = {**answer, "rollout": {**answer["rollout"], "phase": "paused",
                                    "reason": "paused by sigmactl rollout pause"}}
    assert not failed(paused)
    assert failed({**paused, "rollout": {**paused["rollout"], "reason": "instance 1: y"}})
