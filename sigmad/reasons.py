"""Typed instance states and kill reasons (DESIGN.md §3).

Both print the strings operators and records have always seen ("Running",
"KilledBySigma(deleted)", "Signaled(SIGKILL)"), so records stay plain JSON strings and a
reason read back from a record compares equal to the value that wrote it.

A kill reason is exactly one of: OOMKilled, Exited(code), Signaled(SIG),
KilledBySigma(why), NodeLost, SSDLost, FailedToStart(error).
"""

from __future__ import annotations

import signal
from enum import StrEnum


class State(StrEnum):
    """Where an instance is in its life cycle."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    STARTING = "Starting"
    RUNNING = "Running"
    EXITED = "Exited"
    FAILED = "Failed"
    FAILED_TO_START = "FailedToStart"
    NEED_MIGRATION = "NeedMigration"
    TERMINATING = "Terminating"


class Kill(StrEnum):
    """Why sigma itself stopped a container."""

    DELETED = "deleted"
    SCALED_DOWN = "scaled-down"
    UPDATED = "updated"
    MIGRATED = "migrated"
    EVICTED = "evicted"
    RESTARTED = "restarted"
    FENCED = "fenced"


class Reason(str):
    """A kill reason: a string of one of the shapes above, made only by these
    constructors."""

    __slots__ = ()

    @classmethod
    def killed(cls, why: Kill) -> Reason:
        return cls(f"KilledBySigma({why})")

    @classmethod
    def exited(cls, code: int) -> Reason:
        return cls(f"Exited({code})")

    @classmethod
    def signaled(cls, sig: int) -> Reason:
        """Signaled(NAME); an unknown signal number reads as the exit status 128 + it."""
        try:
            return cls(f"Signaled({signal.Signals(sig).name})")
        except ValueError:
            return cls.exited(128 + sig)

    @classmethod
    def failed_to_start(cls, error: str) -> Reason:
        return cls(f"FailedToStart({error})")

    def is_kind(self, kind: str) -> bool:
        """Whether this reason is of `kind` ("Exited", "KilledBySigma", "OOMKilled", …)."""
        return self == kind or self.startswith(kind + "(")


OOM_KILLED = Reason("OOMKilled")
NODE_LOST = Reason("NodeLost")
SSD_LOST = Reason("SSDLost")
CLEAN_EXIT = Reason.exited(0)
