"""The controller's pure restart policy: whether to restart, and how long to wait."""

from __future__ import annotations

import itertools

import pytest

from sigmad.control.drive import MAX_BACKOFF, restart_backoff, should_restart


@pytest.mark.parametrize(
    ("restarts", "seconds"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0)],
)
def test_restart_backoff_doubles(restarts, seconds):
    assert restart_backoff(restarts) == seconds


def test_restart_backoff_is_capped_at_a_minute():
    assert MAX_BACKOFF == 60.0
    for restarts in (7, 8, 20, 100, 10_000):
        assert restart_backoff(restarts) == 60.0


def test_restart_backoff_never_shrinks():
    delays = [restart_backoff(n) for n in range(1, 50)]
    assert delays == sorted(delays)
    assert all(isinstance(d, float) for d in delays)
    assert all(later in (earlier * 2, 60.0) for earlier, later in itertools.pairwise(delays))


@pytest.mark.parametrize(
    "reason",
    [
        "Exited(0)", "Exited(1)", "OOMKilled", "Signaled(SIGKILL)", "Signaled(SIGTERM)",
        "FailedToStart(no such image)",
    ],
)
def test_always_restarts_everything(reason):
    assert should_restart("always", reason) is True


@pytest.mark.parametrize(
    ("reason", "restart"),
    [
        ("Exited(0)", False),
        ("Exited(1)", True),
        ("Exited(3)", True),
        ("OOMKilled", True),
        ("Signaled(SIGKILL)", True),
        ("Signaled(SIGTERM)", True),
        ("FailedToStart(exec failed)", True),
    ],
)
def test_on_failure_restarts_only_failures(reason, restart):
    assert should_restart("on-failure", reason) is restart


@pytest.mark.parametrize(
    "reason", ["Exited(0)", "Exited(1)", "OOMKilled", "Signaled(SIGKILL)", "FailedToStart(x)"]
)
def test_never_restarts_nothing(reason):
    assert should_restart("never", reason) is False


def test_a_taken_name_is_replaced_only_for_a_copy_of_the_same_instance():
    from sigmad.control.drive import _same_instance
    from sigmad.engine import ContainerState

    def c(**labels: str) -> ContainerState:
        return ContainerState("id", "n", labels, False, "exited", 0, False, "", "", "", 0, "")

    mine, ours = "default/web-0", "/sigma/v1"
    assert _same_instance(c(**{"sigma.cluster": ours, "sigma.instance": mine}), mine, ours)
    assert not _same_instance(c(**{"sigma.cluster": "/other", "sigma.instance": mine}), mine,
                              ours)
    # This cluster's container, but another instance's: never removed for this one.
    assert not _same_instance(c(**{"sigma.cluster": ours, "sigma.instance": "a/b-c-0"}), mine,
                              ours)
    assert not _same_instance(c(**{"sigma.cluster": ours}), mine, ours)
    # Made before containers carried a cluster label: only if it is this instance's.
    assert _same_instance(c(**{"sigma.instance": mine}), mine, ours)
    assert not _same_instance(c(), mine, ours)
