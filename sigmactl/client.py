"""A small synchronous client of the Sigma HTTP API (docs/api.md), stdlib only."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

UNAUTHORIZED = (
    "unauthorized: the token is missing or wrong "
    "(use --token, SIGMA_TOKEN or the credentials file written by 'sigmad dev')"
)
NO_SERVER = "no sigma server configured: run 'sigmad dev' or set --server/SIGMA_SERVER"
EVENT_STREAM = "text/event-stream"


class CtlError(Exception):
    """A failure to report as one line that says what to do next."""


def credentials_path() -> Path:
    """`$SIGMA_CREDENTIALS`, else `~/.sigma/credentials.json`."""
    default = Path.home() / ".sigma" / "credentials.json"
    return Path(os.environ.get("SIGMA_CREDENTIALS", default))


def _read_credentials(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CtlError(f"cannot read credentials file {path} ({exc}): fix or remove it") from None
    if not isinstance(data, dict):
        raise CtlError(f"credentials file {path} is not a JSON object: fix or remove it")
    return data


def resolve(server: str | None, token: str | None) -> tuple[str, str | None]:
    """Server and token: the given values, else SIGMA_SERVER/SIGMA_TOKEN, else the file."""
    server = server or os.environ.get("SIGMA_SERVER") or None
    token = token or os.environ.get("SIGMA_TOKEN") or None
    if server is None or token is None:
        stored = _read_credentials(credentials_path())
        server = server or stored.get("server") or None
        token = token or stored.get("token") or None
    if not server:
        raise CtlError(NO_SERVER)
    return str(server), None if token is None else str(token)


def ca_path() -> str | None:
    """The CA that https:// servers are verified with: `$SIGMA_CA`, else the credentials
    file's `ca`; None: the system's CAs."""
    found = os.environ.get("SIGMA_CA") or _read_credentials(credentials_path()).get("ca")
    return str(found) if found else None


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
    if status == 401:
        raise CtlError(UNAUTHORIZED)
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        line = _first_line(text)
        raise CtlError(f"server answered HTTP {status} with non-JSON: {line}") from None
    if 200 <= status < 300:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        raise CtlError(str(error["message"]))
    raise CtlError(f"server answered HTTP {status}: {_first_line(text)}")


class Client:
    """Calls one Sigma server with a bearer token; every failure is a CtlError. An
    https:// server is verified against `ca` (a CA file; the system's CAs when None)."""

    def __init__(self, server: str, token: str | None, timeout: float = 30,
                 ca: str | None = None) -> None:
        if "://" not in server:
            server = f"http://{server}"
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ca = ca
        self.opener, self.stream_opener = _OPENER, _STREAM_OPENER
        if self.server.startswith("https://"):
            context = tls_context(ca)
            self.opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=context))
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
        request = self._request("GET", path, params, accept=EVENT_STREAM)
        with self._open(request, self.stream_opener) as answer:
            kind = answer.headers.get_content_type()
            if kind != EVENT_STREAM:
                raise CtlError(f"server answered {kind}, not an event stream: "
                               "is --server a Sigma master of this version?")
            try:
                yield from sse_data(answer)
            except (OSError, http.client.HTTPException) as exc:
                raise CtlError(f"lost the event stream from {self.server} "
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

    def _open(self, request: urllib.request.Request,
              opener: urllib.request.OpenerDirector | None = None) -> Any:
        """The open answer to `request` (a context manager); CtlError for an HTTP error
        status (decoded from its body) or an unreachable server."""
        try:
            return (opener or self.opener).open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            decode(exc.code, exc.read())  # raises: urllib raises HTTPError for non-2xx only
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _call(
        self, method: str, path: str, params: dict[str, str] | None = None,
        body: bytes | None = None, content_type: str = "application/yaml; charset=utf-8",
    ) -> Any:
        request = self._request(method, path, params, body, content_type)
        try:
            with self._open(request) as answer:
                status, raw = answer.status, answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return decode(status, raw)

    def _unreachable(self, exc: Exception) -> CtlError:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLCertVerificationError):
            where = f"the CA {self.ca}" if self.ca else "the system's CAs"
            return CtlError(
                f"the certificate of {self.server} is not trusted by {where} "
                f"({reason.verify_message or reason}): set SIGMA_CA (or ca in the "
                "credentials file) to the cluster's CA, ca.crt of 'sigmad pki'"
            )
        return CtlError(
            f"cannot reach sigma at {self.server} ({reason or type(exc).__name__}): "
            "is sigmad running? Start one with 'sigmad dev' or set --server/SIGMA_SERVER"
        )


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


class _StreamHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_untimed_reads(http_class), req, **kwargs)


class _StreamHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_untimed_reads(http_class), req, **kwargs)


_OPENER = urllib.request.build_opener()
_STREAM_OPENER = urllib.request.build_opener(_StreamHTTPHandler, _StreamHTTPSHandler)
