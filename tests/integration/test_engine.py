"""sigmad.engine against the real test dockerd: the calls the controller relies on."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from sigmad.engine import LABEL_INSTANCE, DockerEngine, container_config
from sigmad.errors import EngineError
from sigmad.models import Instance
from sigmad.node.dockerd import DEFAULT_CONFIG, userland_proxy
from sigmad.spec import parse
from tests.integration.conftest import IMAGE, EngineHost

SPEC = f"""
app: probe
containers:
  - name: main
    image: {IMAGE}
    command: [sleep, "300"]
    resources: {{limit: {{cpu: 250m, memory: 64Mi}}}}
"""


@pytest.fixture
async def client(engine: EngineHost) -> DockerEngine:
    c = DockerEngine(engine.url)
    yield c  # type: ignore[misc]
    await c.close()


async def test_lifecycle_update_and_events(client: DockerEngine, engine: EngineHost) -> None:
    (app,) = parse(SPEC)
    inst = Instance(namespace=f"t{uuid.uuid4().hex[:6]}", app="probe", index=0, generation=1,
                    ip="10.244.200.9")
    config = container_config(inst, app, app.containers[0])
    await client.ensure_network("10.244.0.0/16", "10.244.0.1")
    assert not await client.ensure_network("10.244.0.0/16", "10.244.0.1")  # idempotent
    with pytest.raises(EngineError) as other:
        await client.ensure_network("10.9.0.0/16", "10.9.0.1")
    assert "remove it (docker network rm sigma) or fix overlay_cidr" in other.value.message
    events: list[dict[str, object]] = []

    async def collect() -> None:
        async for event in client.events({LABEL_INSTANCE: inst.key}):
            events.append(event)

    listener = asyncio.create_task(collect())
    await asyncio.sleep(0.3)
    await client.ensure_image(IMAGE)
    cid = await client.create("sigma-engine-probe", config)
    with pytest.raises(EngineError) as taken:
        await client.create("sigma-engine-probe", config)
    assert taken.value.engine_status == 409
    await client.start(cid)
    state = await client.inspect(cid)
    assert state is not None and state.running and state.labels[LABEL_INSTANCE] == inst.key
    assert state.ip == "10.244.200.9"
    assert engine.inspect(cid)["NetworkSettings"]["Networks"]["sigma"]["MacAddress"] == \
        "0a:58:0a:f4:c8:09"
    assert [c.id for c in await client.find({LABEL_INSTANCE: inst.key})] == [cid]

    await client.update(cid, {"NanoCpus": 1_000_000_000, "Memory": 96 << 20,
                              "MemorySwap": 96 << 20})
    host = engine.inspect(cid)["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (10**9, 96 << 20, 96 << 20)
    assert (await client.inspect(cid)).id == cid  # type: ignore[union-attr]

    await client.stop(cid, timeout=1)
    stopped = await client.inspect(cid)
    assert stopped is not None and not stopped.running
    assert stopped.end_reason() in ("Signaled(SIGTERM)", "Signaled(SIGKILL)")
    await client.stop(cid)  # stopping a stopped container is fine
    await client.remove(cid)
    await client.remove(cid)  # and so is removing a removed one
    assert await client.inspect(cid) is None
    await asyncio.sleep(0.5)
    listener.cancel()
    seen = [e.get("status") for e in events]
    assert {"create", "start", "die", "destroy"} <= set(seen), seen


async def test_missing_image_is_a_clear_error(client: DockerEngine) -> None:
    with pytest.raises(EngineError) as missing:
        await client.ensure_image("127.0.0.1:1/sigma/nothing:here")
    assert missing.value.message.startswith(
        "image 127.0.0.1:1/sigma/nothing:here cannot be pulled: "), missing.value.message


async def test_unreachable_engine_is_an_engine_error() -> None:
    client = DockerEngine("unix:///nonexistent/docker.sock")
    try:
        with pytest.raises(EngineError) as down:
            await client.info()
        assert "unreachable" in down.value.message
    finally:
        await client.close()


def test_the_userland_proxy_is_read_from_the_daemon_behind_the_socket(engine: EngineHost) -> None:
    """The session's dockerd runs without --userland-proxy: dockerd's default (on), unless this
    machine's daemon.json says otherwise."""
    config = json.loads(Path(DEFAULT_CONFIG).read_text()) if Path(DEFAULT_CONFIG).exists() else {}
    assert userland_proxy(engine.url) is bool(config.get("userland-proxy", True))
