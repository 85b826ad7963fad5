"""Which spec changes running containers take in place, and how a resize request changes a
spec (sigmad.api.apps)."""

from __future__ import annotations

import dataclasses

import pytest

from sigmad.api.apps import ResourceChange as Change
from sigmad.api.apps import resources_only, with_resources
from sigmad.errors import SpecError
from sigmad.spec import AppSpec, Resources, parse

SPEC = """
app: web
replicas: 2
containers:
  - name: main
    image: sigma/busybox:latest
    resources: {request: {cpu: 100m, memory: 64Mi}, limit: {cpu: 500m, memory: 128Mi}}
"""
TWO = SPEC + """
  - name: side
    image: sigma/busybox:latest
"""


def spec(text: str = SPEC) -> AppSpec:
    return parse(text)[0]


def test_changed_caps_and_requests_are_in_place() -> None:
    new = with_resources(spec(), Change(limit_cpu=2000, limit_memory=256 << 20,
                                        request_memory=128 << 20))
    assert resources_only(spec(), new)
    main = new.containers[0].resources
    assert main.limit == Resources(2000, 256 << 20)
    assert main.request == Resources(100, 128 << 20)
    assert resources_only(spec(), dataclasses.replace(new, replicas=5))


def test_a_cap_that_appears_or_is_lifted_is_in_place_too() -> None:
    assert resources_only(spec(), with_resources(spec(), Change(limit_cpu=0)))
    uncapped = with_resources(spec(), Change(limit_memory=0, request_memory=0))
    assert resources_only(uncapped, spec())
    assert resources_only(spec(), uncapped)


def test_other_changes_are_not_resources_only() -> None:
    other = spec(SPEC.replace("busybox:latest", "busybox:1"))
    assert not resources_only(spec(), other)
    assert not resources_only(spec(), spec(TWO))


def test_limit_below_request_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        with_resources(spec(), Change(limit_memory=32 << 20))
    assert err.value.field == "limit.memory"


def test_container_must_be_named_when_there_are_several() -> None:
    with pytest.raises(SpecError) as err:
        with_resources(spec(TWO), Change(limit_cpu=1000))
    assert err.value.field == "container" and "name one" in err.value.message
    with pytest.raises(SpecError) as err:
        with_resources(spec(TWO), Change(container="nope", limit_cpu=1000))
    assert "main, side" in err.value.message
    changed = with_resources(spec(TWO), Change(container="side", limit_cpu=1000))
    assert changed.containers[1].resources.limit.cpu_m == 1000
    assert changed.containers[0] == spec(TWO).containers[0]
