"""Terminal sessions (`exec -it`) on fakes: the session table (opened once, by its own token,
before it expires), the resize message's checks, and the WebSocket relay over the API with
the fake engine's terminal: keystrokes and output both ways, resizes, the exit code, the
hang-up and the idle end, each ending the session's marked processes; and sigmactl's
checks of -i/-t before it calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sigmad.api.serving import Limits
from sigmad.api.terminals import MARKER, Terminals, resize_of
from sigmad.errors import Forbidden, NotFound, SpecError
from tests.fakes.engine import FakeEngine, FakeTerminal
from tests.unit.harness import ADMIN, Leader, call, spec
from tests.unit.test_sigmactl_client import Fake, run

EXEC = "/v1/instances/default/web-0/exec"
SHELL = {"command": ["sh"], "stdin": True, "tty": True}


# -- the session table -----------------------------------------------------------------------


def test_a_session_opens_once_with_its_own_token_before_it_expires() -> None:
    now = [100.0]
    table = Terminals(idle=60, open_within=30, most=2, clock=lambda: now[0])
    engine = FakeEngine()
    sid = table.add("tok-a", "default/web-0 main", engine, "c1", "e1", "m1")
    with pytest.raises(Forbidden, match="belongs to another token"):
        table.take(sid, "tok-b")
    session = table.take(sid, "tok-a")  # (another token's try did not use it up)
    assert (session.exec_id, session.marker) == ("e1", "m1")
    with pytest.raises(NotFound, match="each is opened once"):
        table.take(sid, "tok-a")
    late = table.add("tok-a", "w", engine, "c1", "e2", "m2")
    now[0] += 30
    with pytest.raises(NotFound):
        table.take(late, "tok-a")
    first, second, third = (table.add("t", "w", engine, "c", f"e{n}", "m") for n in range(3))
    with pytest.raises(NotFound):  # at most 2 wait: the oldest went
        table.take(first, "t")
    assert table.take(second, "t").exec_id == "e1" and table.take(third, "t").exec_id == "e2"


@pytest.mark.parametrize(("text", "field"), [
    ("not json", "message"), ('{"resize": [0, 80]}', "resize"), ('{"resize": [24]}', "resize"),
    ('{"resize": [24, 80.5]}', "resize"), ('{"resize": [24, 80], "x": 1}', "resize"),
    ('{"resize": [24, true]}', "resize"), ('[24, 80]', "resize"),
])
def test_a_bad_control_message_names_its_field(text: str, field: str) -> None:
    with pytest.raises(SpecError) as bad:
        resize_of(text)
    assert bad.value.field == field
    assert resize_of('{"resize": [24, 80]}') == (24, 80)


# -- over the API ----------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[tuple[TestClient, Leader]]:
    async with Leader() as lead, lead.client(limits=Limits(exec_idle=0.5)) as client:
        await lead.add_node("a")
        await lead.apply(spec(replicas=1))
        await lead.running("web", 1)
        yield client, lead


async def _session(client: TestClient, headers: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    status, made = await call(client, "POST", EXEC, SHELL, headers)
    assert status == 201, made
    return dict(made)


def _terminal(lead: Leader) -> FakeTerminal:
    [term] = lead.engine("a").terminals.values()
    return term


def _ended(lead: Leader, term: FakeTerminal) -> bool:
    """Whether the session's marked processes were ended (the script run with its marker)."""
    marker = next(e for e in term.env if e.startswith(f"{MARKER}="))
    return any(name == "run" and arg.endswith(marker) and "/proc/" in arg
               for name, arg in lead.engine("a").calls)


async def _until_last(ws: aiohttp.ClientWebSocketResponse) -> tuple[bytes, dict[str, Any]]:
    """The output up to the session's last message, and that message."""
    output = b""
    async with asyncio.timeout(5):
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                output += msg.data
            elif msg.type is aiohttp.WSMsgType.TEXT:
                return output, json.loads(msg.data)
    raise AssertionError(f"the session closed without a last message (output {output!r})")


async def test_keystrokes_output_resize_and_the_exit_code(api: tuple[TestClient, Leader]
                                                          ) -> None:
    client, lead = api
    made = await _session(client)
    assert made["path"] == f"/v1/exec/{made['session']}" and made["expires_in"] > 0
    term = _terminal(lead)
    assert term.command == ["sh"] and not term.started
    async with client.ws_connect(made["path"], headers=ADMIN) as ws:
        await ws.send_str(json.dumps({"resize": [40, 100]}))
        term.say(b"$ ")
        await ws.send_bytes(b"echo hi\n")
        await lead.until(lambda: term.sizes == [(40, 100)])
        await ws.send_bytes(b"exit 3\n")
        output, last = await _until_last(ws)
    assert output == b"$ echo hi\nexit 3\n" and last == {"exit_code": 3}
    await lead.until(lambda: _ended(lead, term), what="the marked processes ended")
    async with client.get(made["path"], headers={**ADMIN, "Connection": "Upgrade",
                                                 "Upgrade": "websocket",
                                                 "Sec-WebSocket-Version": "13",
                                                 "Sec-WebSocket-Key": "x" * 22 + "=="}) as r:
        assert r.status == 404  # opened once


async def test_another_token_cannot_open_it(api: tuple[TestClient, Leader]) -> None:
    client, _ = api
    status, made = await call(client, "POST", "/v1/tokens",
                              {"name": "team", "role": "operator", "namespaces": ["default"]})
    assert status == 201, made
    other = {"Authorization": f"Bearer {made['token']}"}
    session = await _session(client)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(session["path"], headers=other)
    assert refused.value.status == 403
    async with client.ws_connect(session["path"], headers=ADMIN) as ws:  # still its maker's
        await ws.send_bytes(b"exit 0\n")
        assert (await _until_last(ws))[1] == {"exit_code": 0}
    mine = await _session(client, other)  # the operator's own session is the operator's
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(mine["path"], headers=ADMIN)
    assert refused.value.status == 403


async def test_a_hang_up_ends_the_sessions_processes(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    made = await _session(client)
    term = _terminal(lead)
    async with client.ws_connect(made["path"], headers=ADMIN) as ws:
        await ws.send_bytes(b"sleep 1000\n")
        assert (await ws.receive_bytes(timeout=5)) == b"sleep 1000\n"
    await lead.until(lambda: term.closed and _ended(lead, term),
                     what="the terminal closed and the marked processes ended")


async def test_an_idle_session_ends(api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    made = await _session(client)
    async with client.ws_connect(made["path"], headers=ADMIN) as ws:
        output, last = await _until_last(ws)
    assert output == b"" and last == {"error": "no input or output for 0.5s: the session ended"}
    term = _terminal(lead)
    await lead.until(lambda: term.closed and _ended(lead, term))


async def test_a_bad_message_ends_the_session_naming_the_field(
        api: tuple[TestClient, Leader]) -> None:
    client, lead = api
    made = await _session(client)
    async with client.ws_connect(made["path"], headers=ADMIN) as ws:
        await ws.send_str('{"resize": [0, 0]}')
        _, last = await _until_last(ws)
    assert last["error"].startswith("resize: must be [rows, cols]")
    await lead.until(lambda: _ended(lead, _terminal(lead)))


@pytest.mark.parametrize(("body", "field"), [
    ({"command": ["sh"], "stdin": True}, "tty"), ({"command": ["sh"], "tty": True}, "stdin"),
    ({**SHELL, "timeout": 5}, "timeout"), ({**SHELL, "tty": "yes"}, "tty"),
    ({**SHELL, "container": "nope"}, "container"),
])
async def test_a_bad_session_request_is_a_400_naming_the_field(
        api: tuple[TestClient, Leader], body: dict[str, Any], field: str) -> None:
    client, lead = api
    status, answer = await call(client, "POST", EXEC, body)
    assert status == 400 and answer["error"]["field"] == field, answer
    assert not lead.engine("a").terminals  # nothing made


async def test_a_session_path_is_a_websocket_only(api: tuple[TestClient, Leader]) -> None:
    client, _ = api
    made = await _session(client)
    status, answer = await call(client, "GET", made["path"])
    assert status == 400 and answer["error"]["field"] == "Upgrade"
    async with client.ws_connect(made["path"], headers=ADMIN) as ws:  # (not used up)
        await ws.send_bytes(b"exit 0\n")
        assert (await _until_last(ws))[1] == {"exit_code": 0}



# -- sigmactl exec -it's checks (before any call) --------------------------------------------


@pytest.mark.parametrize("flags", [["-i"], ["-t"], ["--stdin"]])
def test_sigmactl_exec_refuses_i_without_t(fake: Fake, flags: list[str]) -> None:
    result = run(fake, "exec", *flags, "web-0", "--", "sh")
    assert result.exit_code == 2 and "-i and -t go together" in result.stderr
    assert fake.seen == []


def test_sigmactl_exec_it_needs_a_terminal(fake: Fake) -> None:
    result = run(fake, "exec", "-it", "web-0", "--", "sh")  # (the runner's stdin is no tty)
    assert (result.exit_code, result.stderr) == (
        1, "error: -it needs a terminal on stdin: run it from one (or drop -it to run the "
           "command and print its output)\n")
    assert fake.seen == []  # no session made
