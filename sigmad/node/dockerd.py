"""What the Engine API does not show of this host's dockerd (README "Production dockerd
settings"): its userland proxy, read from the daemon's own command line and daemon.json.

The daemon is found through its unix socket: the peer credentials of a connection (SO_PEERCRED)
name the process that listens on it; when that is not dockerd (systemd's socket activation
listens for it), the one dockerd process of the host is taken instead.

Invariants: only a unix:// engine is read (a tcp:// one runs elsewhere); None means "cannot
tell" and is never turned into a guess; nothing is written. Blocking: run it in a thread.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

DEFAULT_CONFIG = "/etc/docker/daemon.json"  # dockerd's --config-file when none is given
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def option(cmdline: list[str], name: str, boolean: bool = False) -> str | None:
    """The value the command line gives `--name`: `--name=V`, or `--name V` (a `boolean` flag
    takes no separate value: a bare `--name` is "true", as Go's pflag reads it); the last
    one counts; None if it is not there."""
    value = None
    for i, arg in enumerate(cmdline):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}":
            value = "true" if boolean else (cmdline[i + 1] if i + 1 < len(cmdline) else "")
    return value


def userland_proxy_of(cmdline: list[str], config: dict[str, object]) -> bool:
    """Whether a dockerd with this command line and daemon.json runs the userland proxy (its
    default is on)."""
    value = option(cmdline, "userland-proxy", boolean=True)
    if value is not None:
        return value.lower() not in ("false", "0")
    return bool(config.get("userland-proxy", True))


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def _is_dockerd(cmdline: list[str]) -> bool:
    return bool(cmdline) and os.path.basename(cmdline[0]) == "dockerd"


def _daemon(path: str) -> list[str] | None:
    """The command line of the dockerd behind the unix socket `path`, if it can be told."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(path)
        pid, _, _ = CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        CREDENTIALS.size))
    cmdline = _cmdline(pid) if pid else []
    if _is_dockerd(cmdline):
        return cmdline
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                other = _cmdline(int(entry.name))
            except OSError:  # the process has gone
                continue
            if _is_dockerd(other):
                found.append(other)
    return found[0] if len(found) == 1 else None


def userland_proxy(url: str) -> bool | None:
    """Whether the engine at `url` runs the userland proxy; None if that cannot be told."""
    if not url.startswith("unix://"):
        return None
    try:
        cmdline = _daemon(url.removeprefix("unix://"))
        if cmdline is None:
            return None
        path = Path(option(cmdline, "config-file") or DEFAULT_CONFIG)
        config = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return None
    return userland_proxy_of(cmdline, config if isinstance(config, dict) else {})
