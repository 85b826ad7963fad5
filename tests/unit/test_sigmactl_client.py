"""sigmactl client and commands against a tiny real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sigmactl import waits
from sigmactl.cli import cli
from sigmactl.client import NO_SERVER, UNAUTHORIZED, Client, CtlError, api_path, decode, resolve

TOKEN = "s3cret"


@dataclass
class Stream:
    """A `text/event-stream` answer: `chunks` sent one by one, `pause` seconds apart (the
    first after `delay`), chunked, then the connection is closed. A pause ends early when
    the server stops."""

    chunks: list[bytes]
    pause: float = 0.0
    delay: float = 0.0
    content_type: str = "text/event-stream"


def sse(*events: Any) -> list[bytes]:
    """Server-sent events carrying `events` as JSON, one chunk each."""
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events]


@dataclass
class Fake:
    """Answers by (method, path without query): a list of (status, body) used in turn,
    the last one repeating (a Stream body is streamed); records every request."""

    url: str = ""
    routes: dict[tuple[str, str], list[tuple[int, Any]]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def answer(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.routes[(method, path)] = list(answers)


def _handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked streams; urllib asks to close after each

        def _stream(self, stream: Stream) -> None:
            time.sleep(stream.delay)
            self.send_response(200)
            self.send_header("Content-Type", stream.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")  # as aiohttp answers urllib
            self.end_headers()
            for n, chunk in enumerate(stream.chunks):
                if n:
                    fake.stopping.wait(stream.pause)
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            path, _, query = self.path.partition("?")
            fake.seen.append({"method": self.command, "path": path, "query": query,
                              "body": body, "auth": self.headers.get("Authorization"),
                              "type": self.headers.get("Content-Type"),
                              "accept": self.headers.get("Accept")})
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, data = 401, {"error": {"code": "unauthorized", "message": "no",
                                               "field": None}}
            else:
                answers = fake.routes.get((self.command, path), [(404, "404 page\nnot here")])
                status, data = answers.pop(0) if len(answers) > 1 else answers[0]
                if isinstance(data, Stream):
                    return self._stream(data)
            raw = data.encode() if isinstance(data, str) else json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_PUT = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class QuietServer(ThreadingHTTPServer):
    """Tests that give up on purpose (timeouts) hang up on the server: not an error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextlib.contextmanager
def serving() -> Iterator[Fake]:
    """A Fake answering on a free port of 127.0.0.1 until the block ends."""
    state = Fake()
    server = QuietServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()  # a stream still pausing goes on: server_close waits for it
        server.shutdown()
        server.server_close()


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SIGMA_SERVER/SIGMA_TOKEN/SIGMA_CA/SIGMA_CONTEXT, and a credentials file path that
    does not exist yet."""
    for name in ("SIGMA_SERVER", "SIGMA_TOKEN", "SIGMA_CA", "SIGMA_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "credentials.json"
    monkeypatch.setenv("SIGMA_CREDENTIALS", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(fake: Fake, *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["--server", fake.url, "--token", TOKEN, *args], input=stdin)


# credentials


def test_resolve_prefers_options_then_env_then_file(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    clean_env.write_text(json.dumps({"server": "http://file:1", "token": "ft"}))
    assert resolve(None, None) == (["http://file:1"], "ft")
    monkeypatch.setenv("SIGMA_SERVER", "http://env:2")
    monkeypatch.setenv("SIGMA_TOKEN", "et")
    assert resolve(None, None) == (["http://env:2"], "et")
    assert resolve("http://opt:3", "ot") == (["http://opt:3"], "ot")
    monkeypatch.delenv("SIGMA_TOKEN")
    assert resolve("http://opt:3", None) == (["http://opt:3"], "ft")


def test_resolve_without_anything(clean_env: Path) -> None:
    with pytest.raises(CtlError) as err:
        resolve(None, None)
    assert str(err.value) == NO_SERVER
    assert resolve("h:1", None) == (["h:1"], None)


def test_resolve_bad_credentials_file(clean_env: Path) -> None:
    clean_env.write_text("{not json")
    with pytest.raises(CtlError, match=r"cannot read credentials file .*fix or remove it"):
        resolve(None, None)
    clean_env.write_text("[]")
    with pytest.raises(CtlError, match="is not a JSON object"):
        resolve(None, None)


# answers and errors


def test_decode_maps_errors_to_one_line() -> None:
    assert decode(200, b'{"items": []}') == {"items": []}
    assert decode(202, b"") is None
    with pytest.raises(CtlError) as err:
        decode(401, b"whatever")
    assert str(err.value) == UNAUTHORIZED
    body = {"error": {"code": "invalid", "message": "containers[0].image: required",
                      "field": "containers[0].image"}}
    with pytest.raises(CtlError) as err:
        decode(400, json.dumps(body).encode())
    assert str(err.value) == "containers[0].image: required"
    with pytest.raises(CtlError) as err:
        decode(502, b"<html>\nBad Gateway\n</html>")
    assert str(err.value) == "server answered HTTP 502 with non-JSON: <html>"
    with pytest.raises(CtlError) as err:
        decode(500, b'{"oops": 1}')
    assert str(err.value) == 'server answered HTTP 500: {"oops": 1}'


def test_api_path_quotes_parts() -> None:
    assert api_path("apps", "default", "a/b") == "/v1/apps/default/a%2Fb"


def test_client_sends_token_params_and_text(fake: Fake) -> None:
    fake.answer("PUT", "/v1/apps", (200, {"items": []}))
    client = Client(fake.url.removeprefix("http://"), TOKEN)
    assert client.put_text("/v1/apps", "app: web\n", {"dry_run": "true"}) == {"items": []}
    seen = fake.seen[-1]
    assert (seen["method"], seen["query"], seen["body"]) == ("PUT", "dry_run=true", "app: web\n")
    assert seen["auth"] == f"Bearer {TOKEN}"
    assert seen["type"].startswith("application/yaml")


def test_client_errors(fake: Fake) -> None:
    with pytest.raises(CtlError) as err:
        Client(fake.url, "wrong").get("/v1/nodes")
    assert str(err.value) == UNAUTHORIZED
    with pytest.raises(CtlError, match=r"^server answered HTTP 404 with non-JSON: 404 page$"):
        Client(fake.url, TOKEN).delete("/v1/nowhere")
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(CtlError) as err:
        Client(url, TOKEN, timeout=2).get("/v1/nodes")
    message = str(err.value)
    assert message.startswith(f"cannot reach sigma at {url} (")
    assert message.endswith("is sigmad running? Start one with 'sigmad dev' "
                            "or set --server/SIGMA_SERVER")
    assert "\n" not in message


# commands


def test_apply_from_stdin(fake: Fake) -> None:
    items = [{"app": "default/web", "action": "created", "generation": 1},
             {"app": "default/db", "action": "unchanged", "generation": 4}]
    fake.answer("PUT", "/v1/apps", (200, {"items": items}))
    result = run(fake, "apply", "-f", "-", "--dry-run", stdin="app: web\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "app default/web created (generation 1) (dry run)",
        "app default/db unchanged (generation 4) (dry run)",
    ]
    assert fake.seen[-1]["body"] == "app: web\n"


def test_apply_reports_the_field_error(fake: Fake) -> None:
    error = {"error": {"code": "invalid", "message": "replicas: must be >= 0",
                       "field": "replicas"}}
    fake.answer("PUT", "/v1/apps", (400, error))
    result = run(fake, "apply", "-f", "-", stdin="app: web\nreplicas: -1\n")
    assert result.exit_code == 1
    assert result.stderr == "error: replicas: must be >= 0\n"


def test_get_empty_and_filters(fake: Fake) -> None:
    fake.answer("GET", "/v1/instances", (200, {"items": []}))
    result = run(fake, "get", "instance", "-n", "prod", "--app", "web")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "No resources found.\n")
    assert fake.seen[-1]["query"] == "namespace=prod&app=web"
    result = run(fake, "get", "instances", "-o", "json")
    assert (result.exit_code, result.stdout) == (0, "[]\n")


def test_get_apps_filters_by_app_and_nodes_refuse_namespace(fake: Fake) -> None:
    apps: list[dict[str, Any]] = [
        {"namespace": "default", "app": name, "generation": 1, "replicas": 1, "running": 1,
         "spec": {}, "created": 0}
        for name in ("web", "db")
    ]
    fake.answer("GET", "/v1/apps", (200, {"items": apps}))
    result = run(fake, "get", "apps", "--app", "db", "-o", "yaml")
    assert result.exit_code == 0, result.output
    assert "app: db" in result.stdout and "app: web" not in result.stdout
    assert run(fake, "get", "nodes", "-n", "x").exit_code == 2


def test_describe_missing_instance(fake: Fake) -> None:
    error = {"error": {"code": "not_found", "message": "instance default/web-9 not found",
                       "field": None}}
    fake.answer("GET", "/v1/instances/default/web-9", (404, error))
    result = run(fake, "describe", "instance", "web-9")
    assert (result.exit_code, result.stderr) == (1, "error: instance default/web-9 not found\n")


def test_delete_waits_for_instances(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waits, "POLL_INTERVAL", 0.01)
    fake.answer("DELETE", "/v1/apps/default/web", (202, {"app": "default/web",
                                                         "action": "deleted"}))
    two: dict[str, Any] = {"items": [{}, {}]}
    one: dict[str, Any] = {"items": [{}]}
    fake.answer("GET", "/v1/instances", (200, two), (200, two), (200, one), (200, {"items": []}))
    result = run(fake, "delete", "app", "web")
    assert result.exit_code == 0, result.output
    assert result.stdout == "app default/web deleted\n"
    assert result.stderr.splitlines() == ["waiting for 2 instances to stop...",
                                          "waiting for 1 instance to stop..."]
    assert fake.seen[-1]["query"] == "namespace=default&app=web"


def test_delete_wait_times_out(fake: Fake) -> None:
    fake.answer("DELETE", "/v1/apps/prod/web", (202, {"app": "prod/web", "action": "deleted"}))
    fake.answer("GET", "/v1/instances", (200, {"items": [{}]}))
    result = run(fake, "delete", "app", "web", "-n", "prod", "--timeout", "0")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: 1 instance of app prod/web still terminating after 0s: "
        "check with 'sigmactl get instances -n prod --app web'\n"
    )


def test_no_server_configured() -> None:
    result = CliRunner().invoke(cli, ["get", "nodes"])
    assert (result.exit_code, result.stderr) == (1, f"error: {NO_SERVER}\n")
