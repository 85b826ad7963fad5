"""A small synchronous client of the Sigma HTTP API (docs/api.md), stdlib only."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

UNAUTHORIZED = (
    "unauthorized: the token is missing or wrong "
    "(use --token, SIGMA_TOKEN or the credentials file written by 'sigmad dev')"
)
NO_SERVER = "no sigma server configured: run 'sigmad dev' or set --server/SIGMA_SERVER"


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
    """Calls one Sigma server with a bearer token; every failure is a CtlError."""

    def __init__(self, server: str, token: str | None, timeout: float = 30) -> None:
        if "://" not in server:
            server = f"http://{server}"
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET `path` and return its JSON."""
        return self._call("GET", path, params)

    def put_text(self, path: str, text: str, params: dict[str, str] | None = None) -> Any:
        """PUT `text` (YAML or JSON) to `path` and return the answer's JSON."""
        return self._call("PUT", path, params, text.encode("utf-8"))

    def delete(self, path: str) -> Any:
        """DELETE `path` and return the answer's JSON."""
        return self._call("DELETE", path)

    def _call(
        self, method: str, path: str, params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Any:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/yaml; charset=utf-8")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise CtlError(
                f"cannot reach sigma at {self.server} ({reason or type(exc).__name__}): "
                "is sigmad running? Start one with 'sigmad dev' or set --server/SIGMA_SERVER"
            ) from None
        return decode(status, raw)
