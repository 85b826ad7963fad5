"""sigmactl and the HA pair: every master's URL, the first that answers used (and named on
stderr when it is not the first); contexts of the credentials file; token and audit
commands. Against tiny real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sigmactl import contexts
from sigmactl.cli import cli
from sigmactl.client import Client, CtlError, resolve
from tests.unit.test_sigmactl_client import TOKEN, Fake, _free_port, run, serving

NODES = {"items": []}


def dead() -> str:
    """The URL of a port nothing listens on (a killed master)."""
    return f"http://127.0.0.1:{_free_port()}"


def client(*servers: str) -> tuple[Client, list[str]]:
    said: list[str] = []
    return Client(list(servers), TOKEN, timeout=5, say=said.append), said


# -- failover --------------------------------------------------------------------------------


def test_the_first_master_that_answers_is_used_and_named(fake: Fake) -> None:
    fake.answer("GET", "/v1/nodes", (200, NODES))
    first = dead()
    ctl, said = client(first, fake.url)
    assert ctl.get("/v1/nodes") == NODES
    assert len(said) == 1
    assert said[0].startswith(f"sigmactl: {first} (")
    assert said[0].endswith(f"did not answer: using {fake.url}")
    assert "Connection refused" in said[0]
    assert ctl.get("/v1/nodes") == NODES  # it keeps to the master that answered
    assert len(said) == 1


def test_the_first_master_is_used_quietly_while_it_answers(fake: Fake) -> None:
    fake.answer("GET", "/v1/nodes", (200, NODES))
    with serving() as other:
        ctl, said = client(fake.url, other.url)
        assert ctl.get("/v1/nodes") == NODES
    assert said == [] and other.seen == [] and len(fake.seen) == 1


def test_a_change_moves_on_only_when_it_was_never_sent(fake: Fake) -> None:
    fake.answer("PUT", "/v1/apps", (200, {"items": []}))
    first = dead()
    ctl, said = client(first, fake.url)
    assert ctl.put_text("/v1/apps", "app: web\n") == {"items": []}
    assert said and fake.seen[-1]["method"] == "PUT"


def test_a_get_answered_503_tries_the_next_master_a_change_does_not(fake: Fake) -> None:
    lost = {"error": {"code": "store_unavailable", "message": "etcd is unreachable",
                      "field": None}}
    with serving() as other:
        other.answer("GET", "/v1/nodes", (503, lost))
        other.answer("PUT", "/v1/apps", (503, lost))
        fake.answer("GET", "/v1/nodes", (200, NODES))
        fake.answer("PUT", "/v1/apps", (200, {"items": []}))
        ctl, said = client(other.url, fake.url)
        assert ctl.get("/v1/nodes") == NODES
        assert said == [f"sigmactl: {other.url} (HTTP 503: etcd is unreachable) did not "
                        f"answer: using {fake.url}"]
        ctl2, _ = client(other.url, fake.url)
        with pytest.raises(CtlError, match="etcd is unreachable"):
            ctl2.put_text("/v1/apps", "app: web\n")
        assert [s["method"] for s in fake.seen] == ["GET"]  # the PUT was sent once only


def test_no_master_answers() -> None:
    first, second = dead(), dead()
    ctl, said = client(first, second)
    with pytest.raises(CtlError) as err:
        ctl.get("/v1/nodes")
    message = str(err.value)
    assert message.startswith(f"cannot reach sigma at {first} (")
    assert f"), {second} (" in message and "Connection refused" in message
    assert message.endswith("set --server/SIGMA_SERVER") and said == []


def test_an_event_stream_fails_over_too(fake: Fake) -> None:
    from tests.unit.test_sigmactl_client import Stream, sse
    fake.answer("GET", "/v1/events", (200, Stream(sse({"n": 1}, {"n": 2}))))
    ctl, said = client(dead(), fake.url)
    assert list(ctl.events("/v1/events", {"watch": "true"})) == [{"n": 1}, {"n": 2}]
    assert len(said) == 1


def test_the_command_line_says_which_master_it_used(fake: Fake) -> None:
    fake.answer("GET", "/v1/nodes", (200, NODES))
    first = dead()
    result = CliRunner().invoke(cli, ["--server", f"{first},{fake.url}", "--token", TOKEN,
                                      "get", "nodes"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].endswith(f"did not answer: using {fake.url}")


def test_sigma_server_lists_every_master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGMA_SERVER", " http://a:1, http://b:2 ,")
    monkeypatch.setenv("SIGMA_TOKEN", "t")
    assert resolve(None, None) == (["http://a:1", "http://b:2"], "t")
    assert Client("a:1,https://b:2/", "t").servers == ["http://a:1", "https://b:2"]


# -- contexts --------------------------------------------------------------------------------


def write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


TWO = {"current-context": "prod", "contexts": {
    "prod": {"servers": ["http://p1:1", "http://p2:1"], "token": "pt"},
    "lab": {"servers": ["http://l1:1"], "token": "lt"},
}}


def test_resolve_uses_the_current_or_the_named_context(clean_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write(clean_env, TWO)
    assert resolve(None, None) == (["http://p1:1", "http://p2:1"], "pt")
    assert resolve(None, None, "lab") == (["http://l1:1"], "lt")
    monkeypatch.setenv("SIGMA_CONTEXT", "lab")
    assert resolve(None, None) == (["http://l1:1"], "lt")
    assert resolve("http://x:9", None) == (["http://x:9"], "lt")  # its token, that server
    with pytest.raises(CtlError, match=r"no context 'dev' in .* \(contexts: lab, prod\)"):
        resolve(None, None, "dev")


def test_a_first_format_file_is_the_default_context(clean_env: Path) -> None:
    write(clean_env, {"server": "http://a:1,http://b:1", "token": "ft"})
    creds = contexts.load()
    assert creds.current == "default"
    assert creds.contexts == {"default": contexts.Context(["http://a:1", "http://b:1"], "ft")}
    result = CliRunner().invoke(cli, ["config", "get-contexts"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["CURRENT  NAME     SERVERS",
                                          "*        default  http://a:1,http://b:1"]


@pytest.mark.parametrize("text", ["{bad", "[]", '{"contexts": []}',
                                  '{"contexts": {"x": {"servers": 5}}}'])
def test_a_broken_credentials_file_says_to_fix_it(clean_env: Path, text: str) -> None:
    clean_env.write_text(text)
    with pytest.raises(CtlError, match="fix or remove it"):
        resolve(None, None)


def test_config_commands(clean_env: Path) -> None:
    write(clean_env, TWO)
    ctl = CliRunner()
    assert ctl.invoke(cli, ["config", "current-context"]).stdout == "prod\n"
    listed = ctl.invoke(cli, ["config", "get-contexts"]).stdout.splitlines()
    assert listed == ["CURRENT  NAME  SERVERS", "         lab   http://l1:1",
                      "*        prod  http://p1:1,http://p2:1"]
    assert ctl.invoke(cli, ["config", "use-context", "lab"]).stdout == "switched to context lab\n"
    assert ctl.invoke(cli, ["config", "current-context"]).stdout == "lab\n"
    bad = ctl.invoke(cli, ["config", "use-context", "nope"])
    assert bad.exit_code == 1 and "no context 'nope' (contexts: lab, prod)" in bad.stderr
    made = ctl.invoke(cli, ["config", "set-context", "dev", "--server", "http://d:1,http://e:1",
                            "--token", "dt"])
    assert made.exit_code == 0 and made.stdout == "context dev set\n"
    assert contexts.load().contexts["dev"] == contexts.Context(["http://d:1", "http://e:1"],
                                                               "dt")
    assert contexts.load().current == "lab"
    as_json = json.loads(ctl.invoke(cli, ["config", "get-contexts", "-o", "json"]).stdout)
    assert [(c["name"], c["current"]) for c in as_json] == [
        ("prod", False), ("lab", True), ("dev", False)]
    assert "dt" not in json.dumps(as_json)  # tokens are not shown
    assert stat.S_IMODE(os.stat(clean_env).st_mode) == 0o600


def test_commands_use_the_context_option(clean_env: Path, fake: Fake) -> None:
    fake.answer("GET", "/v1/nodes", (200, NODES))
    write(clean_env, {"current-context": "a", "contexts": {
        "a": {"servers": [dead()], "token": "wrong"},
        "b": {"servers": [dead(), fake.url], "token": TOKEN}}})
    result = CliRunner().invoke(cli, ["--context", "b", "get", "nodes"])
    assert result.exit_code == 0, result.output
    assert f"using {fake.url}" in result.stderr


def test_remember_and_forget_keep_other_contexts(clean_env: Path) -> None:
    write(clean_env, {"server": "http://old:1", "token": "ot"})
    contexts.remember("lab-x", ["http://m1:1", "http://m2:1"], "xt")
    creds = contexts.load()
    assert creds.current == "lab-x" and sorted(creds.contexts) == ["default", "lab-x"]
    contexts.forget("lab-x", "another token")  # a newer lab of that name: left alone
    assert "lab-x" in contexts.load().contexts
    contexts.forget("lab-x", "xt")
    assert contexts.load().current == "default" and list(contexts.load().contexts) == [
        "default"]
    contexts.forget("default", "ot")
    assert not clean_env.exists()


# -- token and audit commands ----------------------------------------------------------------

MADE = {"id": "0123456789abcdef", "name": "ci", "role": "operator", "namespaces": ["a"],
        "created": 1.0, "revoked": 0.0, "token": "sigma.0123456789abcdef." + "f" * 64}


def test_token_create_prints_the_secret_once(fake: Fake) -> None:
    fake.answer("POST", "/v1/tokens", (201, MADE))
    result = run(fake, "token", "create", "ci", "--role", "operator", "-n", "a")
    assert result.exit_code == 0, result.output
    assert result.stdout == MADE["token"] + "\n"
    assert "token ci (0123456789abcdef, operator of a) created" in result.stderr
    assert json.loads(fake.seen[-1]["body"]) == {"name": "ci", "role": "operator",
                                                 "namespaces": ["a"]}


def test_token_list_and_revoke(fake: Fake) -> None:
    listed = {k: v for k, v in MADE.items() if k != "token"}
    fake.answer("GET", "/v1/tokens", (200, {"items": [listed]}))
    result = run(fake, "token", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROLE", "NAMESPACES", "AGE", "REVOKED"]
    assert lines[1].split()[:4] == ["0123456789abcdef", "ci", "operator", "a"]
    fake.answer("DELETE", "/v1/tokens/0123456789abcdef", (200, {**listed, "revoked": 2.0}))
    result = run(fake, "token", "revoke", "0123456789abcdef")
    assert result.stdout == "token ci (0123456789abcdef) revoked\n"


def test_audit_shows_the_newest_entries(fake: Fake) -> None:
    entry = {"time": 1.7e9, "token": "abc", "name": "ci", "role": "operator",
             "method": "PUT", "path": "/v1/apps", "status": 200, "apps": ["a/web"],
             "remote": "127.0.0.1"}
    fake.answer("GET", "/v1/audit", (200, {"items": [entry]}))
    result = run(fake, "audit", "--limit", "5")
    assert result.exit_code == 0, result.output
    assert fake.seen[-1]["query"] == "limit=5"
    header, row = result.stdout.splitlines()
    assert header.split() == ["TIME", "TOKEN", "ROLE", "METHOD", "PATH", "STATUS", "APPS"]
    assert "ci (abc)" in row and "a/web" in row and "PUT" in row


def test_a_master_gets_the_short_connect_timeout_then_the_read_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from sigmactl import client as module
    seen: dict[str, Any] = {}

    class Sock:
        def settimeout(self, value: float | None) -> None:
            seen["read"] = value

    def connect(address: Any, timeout: float, source: Any = None) -> Sock:
        seen["connect"] = timeout
        return Sock()

    monkeypatch.setattr(socket, "create_connection", connect)
    module._connect(("m1", 7475), 30)
    assert seen == {"connect": module.CONNECT_TIMEOUT, "read": 30}

    def silent(address: Any, timeout: float, source: Any = None) -> Sock:
        raise TimeoutError("timed out")  # a host that drops the SYN

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(module.NotConnected, match="timed out"):
        module._connect(("m1", 7475), 30)


def test_a_revoked_token_is_named_as_such() -> None:
    from sigmactl.client import UNAUTHORIZED, decode
    body = {"error": {"code": "revoked", "message": "token ci was revoked: ask an admin for "
                      "a new one", "field": None}}
    with pytest.raises(CtlError) as err:
        decode(401, json.dumps(body).encode())
    assert str(err.value) == "unauthorized: token ci was revoked: ask an admin for a new one"
    wrong = {"error": {"code": "unauthorized", "message": "missing", "field": None}}
    with pytest.raises(CtlError, match=UNAUTHORIZED[:20]):
        decode(401, json.dumps(wrong).encode())


def test_a_context_keeps_its_ca(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sigmactl.client import ca_path
    made = CliRunner().invoke(cli, ["config", "set-context", "prod", "--server",
                                    "https://m1:1,https://m2:1", "--token", "t", "--ca",
                                    "/pki/ca.crt"])
    assert made.exit_code == 0, made.output
    contexts.remember("lab-x", ["https://l1:1"], "xt", "/lab/ca.crt")
    assert ca_path() == "/lab/ca.crt"  # the current context's
    assert ca_path("prod") == "/pki/ca.crt"
    assert contexts.load().contexts["prod"].ca == "/pki/ca.crt"
    monkeypatch.setenv("SIGMA_CA", "/env/ca.crt")
    assert ca_path("prod") == "/env/ca.crt"
