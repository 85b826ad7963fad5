"""`sigmad master --check` / `sigmad node --check` (sigmad.check): each finding says what
to fix, and the command exits non-zero when something must be fixed."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import yaml
from click.testing import CliRunner

from sigmad import check, pki
from sigmad.check import FAIL, OK, WARN, Finding
from sigmad.cli import cli
from sigmad.tls import TlsFiles


def issued(tmp_path: Path) -> TlsFiles:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "node", "h1", ("10.0.0.1",))
    return TlsFiles(str(tmp_path / "ca.crt"), str(tmp_path / "node-h1.crt"),
                    str(tmp_path / "node-h1.key"))


def test_certificates_readable_valid_and_keys_private(tmp_path: Path) -> None:
    files = issued(tmp_path)
    found = check.certificate("etcd client", files)
    assert [f.level for f in found] == [OK, OK, OK]
    os.chmod(files.key, 0o644)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650 * 2)
    found = check.certificate("etcd client", files, now=later)
    assert [f.level for f in found] == [FAIL, FAIL, WARN]
    assert "not valid now" in found[1].what and "sigmad pki issue" in found[1].fix
    assert found[2].fix == f"chmod 600 {files.key}"
    gone = check.certificate("x", TlsFiles(str(tmp_path / "nope.crt")))
    assert gone[0].level == FAIL and "unreadable" in gone[0].what


def test_a_certificate_expiring_within_30_days_is_warned(tmp_path: Path) -> None:
    files = issued(tmp_path)
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=825 - 10)
    assert check.certificate("x", TlsFiles(cert=files.cert), now=soon)[0].level == WARN


async def test_an_unreachable_etcd_is_a_failure_with_the_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    [found] = await check.etcd([f"http://127.0.0.1:{port}"], "/t", None, timeout=0.5)
    assert found.level == FAIL and "does not answer" in found.what
    assert "etcd.endpoints" in found.fix


def test_a_data_dir_that_cannot_be_written_fails(tmp_path: Path) -> None:
    assert check.writable_dir("data_dir", tmp_path / "d").level == OK
    (tmp_path / "file").write_text("")
    bad = check.writable_dir("data_dir", tmp_path / "file" / "d")
    assert bad.level == FAIL and "install -d" in bad.fix


def test_ssds_must_be_block_devices(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    found = check.ssds([str(tmp_path / "f"), str(tmp_path / "none")])
    assert [f.level for f in found] == [FAIL, FAIL]


def test_the_report_gives_a_verdict() -> None:
    lines: list[str] = []
    assert check.report([Finding(OK, "a"), Finding(WARN, "b", "do b")], lines.append)
    assert lines[-1] == "0 to fix, 1 warnings" and "      fix: do b" in lines[1]
    assert not check.report([Finding(FAIL, "c", "do c")], lines.append)
    assert lines[-1] == "1 to fix, 0 warnings"


def test_node_check_exits_non_zero_and_says_what_to_fix(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "name": "h1", "engine": f"unix://{tmp_path}/docker.sock",
        "etcd": {"endpoints": [f"http://127.0.0.1:{port}"]}, "data_dir": str(tmp_path / "d")}))
    result = CliRunner().invoke(cli, ["node", "--check", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "FAIL  etcd http://127.0.0.1" in result.output
    assert "FAIL  engine unix://" in result.output and "systemctl start docker" in result.output
    assert "WARN  address is empty" in result.output
    assert "ok    data_dir" in result.output
    assert result.output.strip().endswith("2 to fix, 1 warnings")
