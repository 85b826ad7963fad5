"""`sigmactl config create|apply|get|describe|history|diff|rollback|delete` against a tiny
real HTTP server on 127.0.0.1 (the config center's CLI; the lab test runs it for real)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_sigmactl_client import Fake, run

PATH = "/v1/configs/default/web-conf"
RESULT = {"config": "default/web-conf", "action": "updated", "version": 3,
          "apps": ["default/web"], "instances": ["default/web-0"], "dropped": [],
          "dry_run": True}


def test_create_reads_files_and_says_what_it_would_touch(fake: Fake, tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text("a: 1\n")
    fake.answer("POST", PATH, (200, RESULT))
    result = run(fake, "config", "create", "web-conf", "--from-file", str(tmp_path / "app.yaml"),
                 "--from-file", f"other.txt={tmp_path / 'app.yaml'}", "--format", "yaml",
                 "-m", "why", "--dry-run")
    assert result.exit_code == 0, result.output
    assert json.loads(fake.seen[-1]["body"]) == {
        "files": {"app.yaml": "a: 1\n", "other.txt": "a: 1\n"}, "format": "yaml",
        "comment": "why"}
    assert fake.seen[-1]["query"] == "dry_run=true"
    assert "config default/web-conf updated (version 3) (dry run)" in result.output
    assert "instance default/web-0 would take version 3" in result.output


def test_apply_posts_each_document(fake: Fake) -> None:
    fake.answer("POST", "/v1/configs/ops/a", (201, {**RESULT, "action": "created"}))
    fake.answer("POST", "/v1/configs/default/b", (200, {**RESULT, "action": "unchanged"}))
    text = ("config: a\nnamespace: ops\nfiles: {x: '1'}\nformat: json\n---\n"
            "config: b\nfiles: {y: '2'}\n")
    result = run(fake, "config", "apply", "-f", "-", stdin=text)
    assert result.exit_code == 0, result.output
    assert [s["path"] for s in fake.seen] == ["/v1/configs/ops/a", "/v1/configs/default/b"]
    bad = run(fake, "config", "apply", "-f", "-", stdin="config: c\ncolour: red\n")
    assert bad.exit_code == 1 and "unknown field colour" in bad.output


def test_history_diff_and_rollback(fake: Fake) -> None:
    fake.answer("GET", f"{PATH}/versions", (200, {"items": [
        {"version": 2, "created": 0, "author": "ops", "sha256": "ab" * 32,
         "files": {"a": 3}, "comment": "more"}]}))
    result = run(fake, "config", "history", "web-conf")
    assert result.exit_code == 0 and "more" in result.output and "abababababab" in result.output
    fake.answer("GET", f"{PATH}/versions/1", (200, {"files": {"a": "x\n", "gone": "g\n"}}))
    fake.answer("GET", f"{PATH}/versions/2", (200, {"files": {"a": "y\n"}}))
    result = run(fake, "config", "diff", "web-conf", "1", "2")
    assert result.exit_code == 1
    assert "-x\n+y\n" in result.output and "+++ /dev/null" in result.output
    fake.answer("POST", f"{PATH}/rollback", (200, {**RESULT, "dry_run": False}))
    result = run(fake, "config", "rollback", "web-conf", "--to", "1")
    assert result.exit_code == 0 and json.loads(fake.seen[-1]["body"]) == {"to": 1}
    assert "version 3" in result.output


def test_get_describe_and_a_refused_delete(fake: Fake) -> None:
    head = {"namespace": "default", "name": "web-conf", "latest": 2, "versions": [1, 2],
            "format": "yaml", "used_by": ["default/web"], "created": 0}
    fake.answer("GET", "/v1/configs", (200, {"items": [head]}))
    result = run(fake, "config", "get")
    assert result.exit_code == 0 and "default/web" in result.output
    fake.answer("GET", PATH, (200, {**head, "latest_version": {
        "files": {"a": "hello"}, "author": "ops", "created": 0},
        "instances": [{"instance": "default/web-0", "node": "h1", "pinned": 2, "has": 1}],
        "rollouts": [{"app": "default/web", "version": 1, "from": 1, "state": "reverted",
                      "reason": "configs web-conf v1 → v2 failed on instance web-0: x"}]}))
    result = run(fake, "config", "describe", "web-conf")
    assert result.exit_code == 0, result.output
    assert "default/web-0" in result.output and "hello" in result.output
    assert "reverted" in result.output and "failed on instance web-0: x" in result.output
    fake.answer("DELETE", PATH, (409, {"error": {
        "code": "conflict", "message": "config default/web-conf is in use by default/web",
        "field": None}}))
    result = run(fake, "config", "delete", "web-conf")
    assert result.exit_code == 1 and "in use by default/web" in result.output
