"""The credentials file: named contexts (like kubeconfig's), each one cluster's servers (every
master of its HA pair) and a token; one of them is current. Stdlib only: `sigmad dev` and
`sigmad lab` write it too.

The file (`$SIGMA_CREDENTIALS`, default ~/.sigma/credentials.json, mode 600):

    {"current-context": "lab-demo",
     "contexts": {"lab-demo": {"servers": ["https://10.0.0.1:7475", "https://10.0.0.2:7475"],
                               "token": "...", "ca": "/path/ca.crt"}}}

`ca` (optional) is the CA file https:// servers are verified with. A file of the first
format, `{"server": URL (or "URL,URL"), "token": TOKEN, "ca": FILE}`, reads as one context
named "default" (and is written back in this format once changed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEGACY = "default"  # the context a first-format file reads as


class CredentialsError(Exception):
    """The credentials file cannot be read or written; the message says what to do."""


@dataclass
class Context:
    servers: list[str]
    token: str | None = None
    ca: str = ""  # the CA file that https:// servers are verified with ("": the system's)


@dataclass
class Credentials:
    current: str = ""
    contexts: dict[str, Context] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"current-context": self.current,
                "contexts": {name: {"servers": c.servers, "token": c.token,
                                    **({"ca": c.ca} if c.ca else {})}
                             for name, c in self.contexts.items()}}


def credentials_path() -> Path:
    """`$SIGMA_CREDENTIALS`, else `~/.sigma/credentials.json`."""
    default = Path.home() / ".sigma" / "credentials.json"
    return Path(os.environ.get("SIGMA_CREDENTIALS", default))


def split_servers(text: str) -> list[str]:
    """`URL,URL ...` as a list (blanks dropped)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _servers(value: Any, path: Path, name: str) -> list[str]:
    if isinstance(value, str):
        return split_servers(value)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s.strip() for s in value if s.strip()]
    raise CredentialsError(f"credentials file {path}: context {name!r} needs servers "
                           "(a list of URLs): fix or remove it")


def load(path: Path | None = None) -> Credentials:
    """The credentials in `path` (default: credentials_path()); empty when there is none."""
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Credentials()
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read credentials file {path} ({exc}): "
                               "fix or remove it") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"credentials file {path} is not a JSON object: fix or remove it")
    if "contexts" not in data:
        if not data.get("server") and not data.get("token"):
            return Credentials()
        token = data.get("token")
        return Credentials(LEGACY, {LEGACY: Context(
            _servers(data.get("server") or [], path, LEGACY),
            None if token is None else str(token), str(data.get("ca") or ""))})
    contexts = data["contexts"]
    if not isinstance(contexts, dict):
        raise CredentialsError(f"credentials file {path}: contexts must be an object: "
                               "fix or remove it")
    found = Credentials(str(data.get("current-context") or ""))
    for name, raw in contexts.items():
        if not isinstance(raw, dict):
            raise CredentialsError(f"credentials file {path}: context {name!r} must be an "
                                   "object: fix or remove it")
        token = raw.get("token")
        found.contexts[name] = Context(_servers(raw.get("servers", []), path, name),
                                       None if token is None else str(token),
                                       str(raw.get("ca") or ""))
    return found


def save(creds: Credentials, path: Path | None = None) -> Path:
    """Write `creds` to `path` atomically, readable by its owner only."""
    path = path or credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(creds.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise CredentialsError(f"cannot write credentials file {path}: {exc.strerror}") from None
    return path


def remember(name: str, servers: list[str], token: str, ca: str = "",
             path: Path | None = None) -> Path:
    """Add (or replace) context `name` and make it current; the file's path."""
    creds = load(path)
    creds.contexts[name] = Context(list(servers), token, ca)
    creds.current = name
    return save(creds, path)


def forget(name: str, token: str, path: Path | None = None) -> None:
    """Remove context `name` if it still holds `token` (the file too once it has no
    context left); anything unreadable is left alone."""
    path = path or credentials_path()
    try:
        creds = load(path)
    except CredentialsError:
        return
    context = creds.contexts.get(name)
    if context is None or context.token != token:
        return
    del creds.contexts[name]
    if creds.current == name:
        creds.current = next(iter(creds.contexts), "")
    if creds.contexts:
        save(creds, path)
    else:
        path.unlink(missing_ok=True)
