"""Writing one section of docs/benchmarks.md, leaving the other benchmarks' sections as they
are."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path


def write_section(path: Path, title: str, section: str) -> None:
    """Replace (or add) the "## {title}" section of `path` with `section`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section
    )
    path.write_text(text)


def measured(command: str) -> list[str]:
    """The opening lines of a section: when and where it was measured, and by what command."""
    return [f"Measured {datetime.date.today().isoformat()} on this machine ({os.cpu_count()} "
            f"cores shared with other work, Linux {platform.release()}, Python "
            f"{platform.python_version()}) in one run of:", "", "```", command, "```", ""]
