"""sigmactl against a lab, for the bench scripts: the lab's server, token and CA in the
environment; a failed command ends the bench with sigmactl's own message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sigmad.lab import Lab

REPO = Path(__file__).resolve().parents[1]


class LabCtl:
    def __init__(self, lab: Lab, timeout: float) -> None:
        self.lab = lab
        self.timeout = timeout  # seconds one sigmactl command may take
        self.env = {**os.environ, "SIGMA_SERVER": lab.server, "SIGMA_TOKEN": lab.token,
                    "SIGMA_CA": lab.ca, "PYTHONPATH": str(REPO)}

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run([sys.executable, "-m", "sigmactl", *args], input=stdin,
                                capture_output=True, text=True, env=self.env,
                                timeout=self.timeout)
        if result.returncode:
            raise SystemExit(f"sigmactl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def instances(self, app: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.ctl("get", "instances", "--app", app,
                                                          "-o", "json"))
        return found
