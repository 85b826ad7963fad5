"""Console sign-ins (sigmad.api.console): sessions of one master, kept in its memory.

Invariants:
- the cookie's value is 32 random bytes; only its SHA-256 is kept, so the table does not
  hold working cookies;
- at most `most` sessions (a new one pushes out the oldest), none used beyond its expiry.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from sigmad.tokens import Principal

COOKIE = "sigma_console"
CSRF_HEADER = "X-Sigma-CSRF"
SESSION_TTL = 8 * 3600  # seconds a sign-in lasts at most
MAX_SESSIONS = 1024


@dataclass(frozen=True)
class Session:
    who: Principal
    csrf: str
    expires: float  # time.time() after which it is refused


class Sessions:
    """Console sign-ins of this master, by the SHA-256 of their cookie (module docstring)."""

    def __init__(self, ttl: float = SESSION_TTL, most: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.most = most
        self._by_digest: OrderedDict[str, Session] = OrderedDict()

    def open(self, who: Principal, now: float) -> tuple[str, Session]:
        """A new session for `who`: (the cookie's value, the session)."""
        cookie = secrets.token_urlsafe(32)
        session = Session(who, secrets.token_urlsafe(24), now + self.ttl)
        self._by_digest[_digest(cookie)] = session
        while len(self._by_digest) > self.most:
            self._by_digest.popitem(last=False)
        return cookie, session

    def get(self, cookie: str, now: float) -> Session | None:
        """The live session of `cookie` (None when unknown, ended or expired)."""
        if not cookie:
            return None
        key = _digest(cookie)
        session = self._by_digest.get(key)
        if session is not None and session.expires <= now:
            del self._by_digest[key]
            return None
        return session

    def close(self, cookie: str) -> None:
        self._by_digest.pop(_digest(cookie), None)


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()
