"""Fixtures shared by the sigmactl unit tests: a stub API server and a clean environment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_sigmactl_client import Fake, isolate, serving


@pytest.fixture
def fake() -> Iterator[Fake]:
    with serving() as state:
        yield state


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SIGMA_SERVER/SIGMA_TOKEN from the caller's environment leaks into a test."""
    return isolate(monkeypatch, tmp_path)
