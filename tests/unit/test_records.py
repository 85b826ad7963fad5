"""Dataclass records to and from JSON: nested records survive, unknown keys are ignored."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sigmad.models import (
    MAX_TERMINATIONS,
    AppRecord,
    ContainerStatus,
    Instance,
    Node,
    Termination,
)
from sigmad.reasons import State
from sigmad.records import dumps, from_dict, loads, to_dict
from sigmad.spec import (
    AppSpec,
    ContainerSpec,
    Placement,
    Resources,
    ResourceSpec,
)


def an_instance() -> Instance:
    return Instance(
        namespace="prod",
        app="web",
        index=2,
        generation=7,
        state=State.RUNNING,
        reason="started",
        node="n1",
        ip="10.244.0.5",
        request=Resources(cpu_m=1500, memory=2**30),
        containers=[
            ContainerStatus("main", id="abc", state="running", exit_code=None,
                            started_at="2024-01-01T00:00:00Z"),
            ContainerStatus("side", id="def", state="exited", exit_code=137,
                            finished_at="2024-01-01T00:01:00Z"),
        ],
        restarts=3,
        next_start=123.5,
        terminations=[
            Termination("main", "OOMKilled", 100.0, "old1"),
            Termination("side", "Signaled(SIGKILL)", 101.25),
        ],
        created=1.0,
        updated=2.0,
    )


def an_app_record() -> AppRecord:
    spec = AppSpec(
        app="web",
        namespace="prod",
        replicas=3,
        containers=[
            ContainerSpec(
                name="main",
                image="busybox:latest",
                command=["httpd", "-f"],
                env={"MODE": "prod"},
                resources=ResourceSpec(Resources(1000, 2**31), Resources(4000, 2**33)),
            ),
            ContainerSpec(name="side", image="alpine"),
        ],
        placement=Placement(labels={"zone": "bj-1"}),
        restart="on-failure",
    )
    return AppRecord(spec=spec, generation=4, created=10.0, updated=20.0)


def test_instance_round_trip():
    inst = an_instance()
    back = loads(Instance, dumps(inst))
    assert back == inst
    # Nested values come back as records, not dicts.
    assert isinstance(back.request, Resources)
    assert all(isinstance(c, ContainerStatus) for c in back.containers)
    assert all(isinstance(t, Termination) for t in back.terminations)
    assert back.containers[0].exit_code is None
    assert back.containers[1].exit_code == 137
    assert back.key == "prod/web-2"


def test_app_record_round_trip():
    rec = an_app_record()
    back = loads(AppRecord, dumps(rec))
    assert back == rec
    assert isinstance(back.spec, AppSpec)
    assert isinstance(back.spec.containers[0], ContainerSpec)
    assert isinstance(back.spec.containers[0].resources.limit, Resources)
    assert isinstance(back.spec.placement, Placement)
    assert back.spec.request() == Resources(1000, 2**31)
    assert back.spec.key == "prod/web"


def test_node_round_trip():
    node = Node(
        name="n1", engine="tcp://10.0.0.1:2375", address="10.0.0.1", labels={"zone": "a"},
        capacity=Resources(8000, 16 * 2**30), allocatable=Resources(7500, 15 * 2**30),
        draining=True, engine_version="24.0.7", updated=5.0,
    )
    back = loads(Node, dumps(node))
    assert back == node
    assert isinstance(back.allocatable, Resources)


def test_dumps_is_compact_json_in_field_order():
    data = dumps(Resources(cpu_m=500, memory=1024))
    assert data == b'{"cpu_m":500,"memory":1024}'
    raw = dumps(an_instance())
    assert b", " not in raw
    assert b": " not in raw
    assert list(json.loads(raw)) == [f.name for f in dataclasses.fields(Instance)]
    assert json.loads(raw) == to_dict(an_instance())


def test_to_dict_is_plain_json_data():
    d = to_dict(an_app_record())
    assert d["spec"]["containers"][0]["resources"]["request"] == {"cpu_m": 1000, "memory": 2**31}
    assert d["spec"]["placement"] == {
        "labels": {"zone": "bj-1"}, "expressions": [], "spread": "", "strategy": "spread",
    }
    assert d["generation"] == 4
    # A copy: changing it does not touch the record.
    rec = an_app_record()
    d = to_dict(rec)
    d["spec"]["containers"][0]["env"]["MODE"] = "dev"
    assert rec.spec.containers[0].env == {"MODE": "prod"}


def test_unknown_keys_are_ignored():
    d = to_dict(an_instance())
    d["future_field"] = {"x": 1}
    d["request"]["gpus"] = 2
    d["containers"][0]["health"] = "ok"
    d["terminations"][0]["signal"] = 9
    back = from_dict(Instance, d)
    assert back == an_instance()


def test_unknown_keys_ignored_in_nested_spec():
    d = to_dict(an_app_record())
    d["spec"]["secrets"] = [{"name": "data"}]
    d["spec"]["containers"][1]["healthcheck"] = {"tcp": 80}
    assert from_dict(AppRecord, d) == an_app_record()


def test_missing_optional_keys_take_defaults():
    inst = loads(Instance, b'{"namespace":"default","app":"web","index":0,"generation":1}')
    assert inst == Instance(namespace="default", app="web", index=0, generation=1)
    assert inst.state == State.PENDING
    assert inst.request == Resources(0, 0)
    assert inst.containers == []
    assert inst.terminations == []
    assert inst.restarts == 0


def test_missing_optional_nested_keys_take_defaults():
    rec = loads(AppRecord, json.dumps({
        "spec": {"app": "web", "containers": [{"name": "m", "image": "i"}]},
    }).encode())
    assert rec.generation == 1
    assert rec.spec.namespace == "default"
    assert rec.spec.replicas == 1
    assert rec.spec.restart == "always"
    assert rec.spec.placement == Placement()
    assert rec.spec.containers[0].resources == ResourceSpec()


def test_null_optional_value_stays_none():
    d = to_dict(an_instance())
    d["containers"][0]["exit_code"] = None
    assert from_dict(Instance, d).containers[0].exit_code is None


def test_missing_required_key_fails():
    with pytest.raises(TypeError):
        loads(Instance, b'{"namespace":"default","app":"web","index":0}')


def test_defaults_are_not_shared_between_loaded_records():
    a = loads(Instance, b'{"namespace":"n","app":"a","index":0,"generation":1}')
    b = loads(Instance, b'{"namespace":"n","app":"a","index":1,"generation":1}')
    a.terminations.append(Termination("m", "Exited(0)", 1.0))
    a.request.cpu_m = 5
    assert b.terminations == []
    assert b.request.cpu_m == 0


# --- Instance helpers ------------------------------------------------------------------------


def test_instance_name_and_key():
    inst = Instance(namespace="ns", app="web", index=12, generation=1)
    assert inst.name == "web-12"
    assert inst.key == "ns/web-12"


def test_terminated_records_reason_and_keeps_the_last_five():
    inst = Instance(namespace="ns", app="web", index=0, generation=1)
    for i in range(8):
        inst.terminated("main", f"Exited({i})", f"c{i}")
    assert len(inst.terminations) == MAX_TERMINATIONS == 5
    assert [t.reason for t in inst.terminations] == [f"Exited({i})" for i in range(3, 8)]
    assert [t.container_id for t in inst.terminations] == [f"c{i}" for i in range(3, 8)]
    assert all(t.container == "main" for t in inst.terminations)
    assert all(t.at > 0 for t in inst.terminations)


def test_terminated_below_the_cap_keeps_all():
    inst = Instance(namespace="ns", app="web", index=0, generation=1)
    inst.terminated("main", "OOMKilled")
    inst.terminated("side", "Exited(1)", "x")
    assert [(t.container, t.reason, t.container_id) for t in inst.terminations] == [
        ("main", "OOMKilled", ""),
        ("side", "Exited(1)", "x"),
    ]


def test_instance_names_are_split_whole_with_ascii_digits() -> None:
    from sigmad.models import split_name

    assert split_name("web-0") == ("web", 0)
    assert split_name("a-b-c-12") == ("a-b-c", 12)
    for bad in ("web", "web-", "-1", "web-\u00b2", "web-0\n", "web-1x", "Web-1",
                "web-" + "9" * 10, "web-\u0663"):
        assert split_name(bad) is None, bad
