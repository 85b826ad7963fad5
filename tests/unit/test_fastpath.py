"""The host-compatible fast path's inputs: what the agent reads from its engine (the netlink
side is covered by the lab test tests/integration/test_fastpath.py)."""

from __future__ import annotations

from sigmad.engine import LABEL_HOST_PORTS, LABEL_INSTANCE
from sigmad.network.overlay import FastInstance, _port_keys
from sigmad.node.fastpath import FastPathKeeper, parse_ports
from tests.fakes.engine import FakeEngine


def test_parse_ports_reads_the_label_and_skips_what_is_malformed():
    assert parse_ports("32400/tcp,32401/udp") == ((32400, "tcp"), (32401, "udp"))
    assert parse_ports("") == ()
    assert parse_ports("x/tcp,32402/sctp,32403,32404/tcp") == ((32404, "tcp"),)


def test_u32_keys_match_address_protocol_and_port():
    assert _port_keys("10.84.0.12", 32420, "tcp") == [
        "0x0a54000c/0xffffffff+16", "0x00060000/0x00ff0000+8", "0x00007ea4/0x0000ffff+20"]
    assert _port_keys("10.84.0.12", 53, "udp")[1] == "0x00110000/0x00ff0000+8"


def test_device_name_fits_the_kernel_limit():
    assert FastInstance("0123456789abcdef" * 4, 7, ()).device == "shc0123456789ab"
    assert len(FastInstance("f" * 64, 7, ()).device) == 15


async def test_wanted_is_the_running_labelled_containers() -> None:
    engine = FakeEngine()

    def body(instance: str, ports: str = "") -> dict[str, object]:
        labels = {LABEL_INSTANCE: instance, **({LABEL_HOST_PORTS: ports} if ports else {})}
        return {"Image": "img", "Labels": labels}

    hc = await engine.create("hc", body("default/hc-0", "31001/tcp"))
    await engine.start(hc)
    stopped = await engine.create("old", body("default/hc-1", "31002/tcp"))
    overlay = await engine.create("ov", body("default/ov-0"))
    await engine.start(overlay)
    keeper = FastPathKeeper("10.0.0.5", engine)
    assert await keeper.wanted() == [FastInstance(hc, 1, ((31001, "tcp"),))]
    assert stopped not in keeper.pids
    inspected = sum(1 for call, _ in engine.calls if call == "inspect")
    await keeper.wanted()  # the pid is known: no second inspect
    assert sum(1 for call, _ in engine.calls if call == "inspect") == inspected
    engine.exit(hc, 0)
    assert await keeper.wanted() == [] and keeper.pids == {}
