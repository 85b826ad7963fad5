"""A small synchronous client of the Sigma HTTP API (docs/api.md), stdlib only.

A client knows every master of a cluster (the HA pair) and uses the first that answers: it
tries them in order, each with a short connect timeout, keeps to the one that answered, and
says on stderr when that is not the one it tried first. A call moves on to the next master
only when it was never sent (no connection), or, for a GET, when the master answered 503
(it has lost etcd): a change is never sent twice.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any

from sigmactl import contexts

UNAUTHORIZED = (
    "unauthorized: the token is missing or wrong "
    "(use --token, SIGMA_TOKEN or the credentials file written by 'sigmad dev')"
)
NO_SERVER = "no sigma server configured: run 'sigmad dev' or set --server/SIGMA_SERVER"
EVENT_STREAM = "text/event-stream"
CONNECT_TIMEOUT = 2.0  # seconds to connect to one master before trying the next


class CtlError(Exception):
    """A failure to report as one line that says what to do next."""


def resolve(server: str | None, token: str | None, context: str | None = None
            ) -> tuple[list[str], str | None]:
    """Servers and token: the given values, else SIGMA_SERVER/SIGMA_TOKEN, else the
    credentials file's context `context` (else SIGMA_CONTEXT, else its current one).
    A server value may list several masters, comma-separated."""
    server = server or os.environ.get("SIGMA_SERVER") or None
    token = token or os.environ.get("SIGMA_TOKEN") or None
    context = context or os.environ.get("SIGMA_CONTEXT") or None
    servers = contexts.split_servers(server) if server else []
    if not servers or token is None or context:
        try:
            creds = contexts.load()
        except contexts.CredentialsError as exc:
            raise CtlError(str(exc)) from None
        name = context or creds.current
        found = creds.contexts.get(name)
        if context and found is None:
            known = ", ".join(sorted(creds.contexts)) or "none"
            raise CtlError(f"no context {context!r} in {contexts.credentials_path()} "
                           f"(contexts: {known}): see 'sigmactl config get-contexts'")
        if found is not None:
            servers = servers or found.servers
            token = token or found.token
    if not servers:
        raise CtlError(NO_SERVER)
    return servers, token


def ca_path(context: str | None = None) -> str | None:
    """The CA that https:// servers are verified with: `$SIGMA_CA`, else the `ca` of the
    credentials file's context `context` (else SIGMA_CONTEXT's, else the current one);
    None: the system's CAs."""
    found = os.environ.get("SIGMA_CA")
    if not found:
        try:
            creds = contexts.load()
        except contexts.CredentialsError as exc:
            raise CtlError(str(exc)) from None
        name = context or os.environ.get("SIGMA_CONTEXT") or creds.current
        chosen = creds.contexts.get(name)
        found = chosen.ca if chosen else ""
    return found or None


def tls_context(ca: str | None) -> ssl.SSLContext:
    """A context that verifies the server against `ca` (the system's CAs when None)."""
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise CtlError(f"cannot use the CA file {ca} ({exc}): fix SIGMA_CA or the "
                       f"credentials file's ca") from None


def api_path(*parts: str) -> str:
    """`/v1/` followed by the URL-quoted parts."""
    return "/v1/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "(empty body)"


def decode(status: int, raw: bytes) -> Any:
    """The JSON of a successful answer; CtlError with a useful message otherwise."""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        if status == 401:
            raise CtlError(UNAUTHORIZED) from None
        line = _first_line(text)
        raise CtlError(f"server answered HTTP {status} with non-JSON: {line}") from None
    if 200 <= status < 300:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if status == 401:
        if isinstance(error, dict) and error.get("code") == "revoked":
            raise CtlError(f"unauthorized: {error.get('message')}")
        raise CtlError(UNAUTHORIZED)
    if isinstance(error, dict) and error.get("message"):
        raise CtlError(str(error["message"]))
    raise CtlError(f"server answered HTTP {status}: {_first_line(text)}")


class NotConnected(OSError):
    """No connection to a master could be made: the request was never sent."""


def _url(server: str) -> str:
    return (server if "://" in server else f"http://{server}").rstrip("/")


class Client:
    """Calls a Sigma cluster, one of its masters at a time (see the module docstring), with
    a bearer token; every failure is a CtlError. An https:// server is verified against
    `ca` (a CA file; the system's CAs when None)."""

    def __init__(self, servers: str | Sequence[str], token: str | None, timeout: float = 30,
                 ca: str | None = None, say: Callable[[str], None] | None = None) -> None:
        given = contexts.split_servers(servers) if isinstance(servers, str) else list(servers)
        self.servers = [_url(s) for s in given] or [_url("")]
        self.server = self.servers[0]  # the master in use
        self.token = token
        self.timeout = timeout
        self.ca = ca
        self.say = say or _stderr
        self.opener, self.stream_opener = _OPENER, _STREAM_OPENER
        if any(s.startswith("https://") for s in self.servers):
            context = tls_context(ca)
            self.opener = urllib.request.build_opener(_HTTPHandler,
                                                      _HTTPSHandler(context=context))
            self.stream_opener = urllib.request.build_opener(
                _StreamHTTPHandler, _StreamHTTPSHandler(context=context))

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET `path` and return its JSON."""
        return self._call("GET", path, params)

    def put_text(self, path: str, text: str, params: dict[str, str] | None = None) -> Any:
        """PUT `text` (YAML or JSON) to `path` and return the answer's JSON."""
        return self._call("PUT", path, params, text.encode("utf-8"))

    def post_json(self, path: str, body: Any) -> Any:
        """POST `body` as JSON to `path` and return the answer's JSON."""
        return self._call("POST", path, None, json.dumps(body).encode("utf-8"),
                          "application/json")

    def delete(self, path: str) -> Any:
        """DELETE `path` and return the answer's JSON."""
        return self._call("DELETE", path)

    def events(self, path: str, params: dict[str, str] | None = None
               ) -> Generator[Any, None, None]:
        """The JSON of each server-sent event of `path`, as it arrives. Connecting and the
        answer's headers have the usual timeout; waiting for the next event has none. Ends
        when the server closes the stream."""
        with self._open(lambda: self._request("GET", path, params, accept=EVENT_STREAM),
                        self.stream_opener) as answer:
            kind = answer.headers.get_content_type()
            if kind != EVENT_STREAM:
                raise CtlError(f"server answered {kind}, not an event stream: "
                               "is --server a Sigma master of this version?")
            try:
                yield from sse_data(answer)
            except (OSError, http.client.HTTPException) as exc:
                raise CtlError(f"lost the event stream from {self.server} "
                               f"({exc or type(exc).__name__}): run the command again") from None

    def text(self, path: str, params: dict[str, str] | None = None
             ) -> Generator[bytes, None, None]:
        """A text answer of `path` as it arrives (a follow waits for its next bytes without
        a timeout); ends when the server ends it."""
        with self._open(lambda: self._request("GET", path, params, accept="text/plain"),
                        self.stream_opener) as answer:
            try:
                while chunk := answer.read1(65536):
                    yield chunk
            except (OSError, http.client.HTTPException) as exc:
                raise CtlError(f"lost the stream from {self.server} "
                               f"({exc or type(exc).__name__}): run the command again") from None

    def _request(
        self, method: str, path: str, params: dict[str, str] | None = None,
        body: bytes | None = None, content_type: str = "application/yaml; charset=utf-8",
        accept: str = "application/json",
    ) -> urllib.request.Request:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Accept", accept)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def _open(self, make: Callable[[], urllib.request.Request],
              opener: urllib.request.OpenerDirector | None = None) -> Any:
        """The open answer (a context manager) to the request `make` builds for the master
        in use, trying the next master while one cannot be reached (or a GET is answered
        503); CtlError for an HTTP error status (decoded from its body) or when no master
        can be reached."""
        order = [self.server, *(s for s in self.servers if s != self.server)]
        missed: list[tuple[str, str]] = []
        for n, server in enumerate(order):
            self.server = server
            request = make()
            last = n == len(order) - 1
            try:
                answer = (opener or self.opener).open(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or request.get_method() != "GET" or last:
                    decode(exc.code, exc.read())  # raises: HTTPError is for non-2xx only
                    raise
                missed.append((server, f"HTTP 503: {_message(exc.read())}"))
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                if not isinstance(reason, NotConnected) or last:
                    raise self._unreachable(exc, missed) from None
                missed.append((server, _why(reason)))
                continue
            if missed:
                skipped = ", ".join(f"{s} ({why})" for s, why in missed)
                self.say(f"sigmactl: {skipped} did not answer: using {server}")
            return answer
        raise AssertionError("unreachable: the last master raises")

    def _call(
        self, method: str, path: str, params: dict[str, str] | None = None,
        body: bytes | None = None, content_type: str = "application/yaml; charset=utf-8",
    ) -> Any:
        try:
            with self._open(lambda: self._request(method, path, params, body,
                                                  content_type)) as answer:
                status, raw = answer.status, answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return decode(status, raw)

    def _unreachable(self, exc: Exception, missed: Sequence[tuple[str, str]] = ()
                     ) -> CtlError:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLCertVerificationError):
            where = f"the CA {self.ca}" if self.ca else "the system's CAs"
            return CtlError(
                f"the certificate of {self.server} is not trusted by {where} "
                f"({reason.verify_message or reason}): set SIGMA_CA (or ca in the "
                "credentials file) to the cluster's CA, ca.crt of 'sigmad pki'"
            )
        tried = [*(f"{s} ({why})" for s, why in missed), f"{self.server} ({_why(reason)})"]
        return CtlError(
            f"cannot reach sigma at {', '.join(tried)}: "
            "is sigmad running? Start one with 'sigmad dev' or set --server/SIGMA_SERVER"
        )


def _why(reason: object) -> str:
    if isinstance(reason, NotConnected) and reason.__cause__ is not None:
        reason = reason.__cause__
    return str(reason) or type(reason).__name__


def _message(raw: bytes) -> str:
    """The error message of an API error body, else its first line."""
    text = raw.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error", {})
        return str(error["message"])
    except (ValueError, AttributeError, KeyError, TypeError):
        return _first_line(text)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sse_data(lines: Iterable[bytes]) -> Iterator[Any]:
    """The JSON `data` of each event in a `text/event-stream` read as byte lines: `data:`
    lines are joined until a blank line; comments (`:`) and other fields are skipped, and an
    event cut off by the end of the stream is dropped."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield _event_json("\n".join(data))
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))


def _event_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise CtlError(f"server sent an event that is not JSON: {_first_line(text)}") from None


def _untimed_reads(connection: Any) -> Any:
    """A subclass of an http.client connection class whose socket has no timeout once the
    answer's headers are in: a watch may wait for its next event for as long as it likes."""

    class Untimed(connection):
        def getresponse(self) -> http.client.HTTPResponse:
            sock = self.sock  # dropped by getresponse when the server says it will close
            answer = super().getresponse()
            if sock is not None:
                sock.settimeout(None)  # the answer still reads from it
            return answer

    return Untimed


def _connecting(connection: Any) -> Any:
    """A subclass of an http.client connection class that connects within CONNECT_TIMEOUT
    (then reads with the usual timeout) and raises NotConnected when it cannot connect."""

    class Connecting(connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = _connect

    return Connecting


def _connect(address: tuple[str, int], timeout: Any = None,
             source_address: Any = None) -> socket.socket:
    read = timeout if isinstance(timeout, int | float) else None
    try:
        sock = socket.create_connection(address, min(read or CONNECT_TIMEOUT, CONNECT_TIMEOUT),
                                        source_address)
    except OSError as exc:
        raise NotConnected(str(exc) or type(exc).__name__) from exc
    sock.settimeout(read)
    return sock


class _HTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_connecting(http_class), req, **kwargs)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_connecting(http_class), req, **kwargs)


class _StreamHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_untimed_reads(_connecting(http_class)), req, **kwargs)


class _StreamHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_untimed_reads(_connecting(http_class)), req, **kwargs)


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)
_STREAM_OPENER = urllib.request.build_opener(_StreamHTTPHandler, _StreamHTTPSHandler)
