"""Fuzz of a real master's API (`sigmad master` on a real etcd): random methods, paths and
bodies (spec-like YAML and JSON with YAML's sharp edges, raw bytes, hostile sizes and
nesting), with the token. Whatever is sent, the answer is a 2xx or a 4xx with a JSON error,
never a 5xx, and the master still answers afterwards."""

from __future__ import annotations

import http.client
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigmad.procs import EtcdProcess
from tests.integration.conftest import free_port, stop_process, wait_for
from tests.unit.test_spec_fuzz import texts

CASES = 3000
ROUTES = [
    ("GET", "/v1/nodes"), ("GET", "/v1/nodes/{x}"), ("POST", "/v1/nodes/{x}/drain"),
    ("POST", "/v1/nodes/{x}/uncordon"), ("GET", "/v1/apps"), ("PUT", "/v1/apps"),
    ("GET", "/v1/apps/{x}/{y}"), ("DELETE", "/v1/apps/{x}/{y}"),
    ("POST", "/v1/apps/{x}/{y}/resources"), ("GET", "/v1/instances"),
    ("GET", "/v1/instances/{x}/{y}"), ("POST", "/v1/instances/{x}/{y}/migrate"),
    ("GET", "/v1/pool"), ("GET", "/v1/masters"), ("GET", "/v1/events"),
    ("PATCH", "/v1/apps"), ("GET", "/v1/{x}"), ("GET", "/{x}"),
    ("POST", "/v1/tokens"), ("GET", "/v1/tokens"), ("DELETE", "/v1/tokens/{x}"),
    ("GET", "/v1/audit"),
    *[("PUT", "/v1/apps"), ("POST", "/v1/apps/default/web/resources")] * 4,
]
SEGMENTS = ["default", "web", "web-0", "web-%C2%B2", "web-99999999999999999999", "a-b", "..", ".",
            "%2F", "%00", "%ff", "%c3%28", "web%0A", "x" * 300, "node-1", "", "web-0-0"]


class Master:
    def __init__(self, root: Path, etcd: EtcdProcess) -> None:
        self.port = free_port()
        self.token = secrets.token_hex(16)
        config = root / "master.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "token": self.token,
            "etcd": {"endpoints": [etcd.endpoint], "prefix": f"/fuzz-{uuid.uuid4().hex[:8]}"},
        }))
        self.log = root / "master.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sigmad", "master", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.call("GET", "/healthz")[0] == 200, 20, "the master's API")

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={
                "Authorization": f"Bearer {self.token}", **(headers or {})})
            answer = conn.getresponse()
            return answer.status, answer.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()


@pytest.fixture
def master(tmp_path: Path, etcd: EtcdProcess) -> Iterator[Master]:
    m = Master(tmp_path, etcd)
    yield m
    stop_process(m.proc)


def segment() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=20).map(
        lambda s: quote(s, safe="")), st.binary(max_size=12).map(
        lambda b: "".join(f"%{c:02x}" for c in b)))


paths = st.builds(lambda route, x, y, q: (route[0], route[1].format(x=x, y=y) + q),
                  st.sampled_from(ROUTES), segment(), segment(),
                  st.sampled_from(["", "?limit=x", "?limit=99999999999999999999999",
                                   "?namespace=%ff", "?dry_run=true", "?app=web%00",
                                   "?limit=-5", "?kind=%C2%B2"]))
bodies = st.one_of(
    st.none(),
    texts.map(lambda t: t.encode("utf-8", "replace")),
    st.binary(max_size=300),
    st.recursive(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=8)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(st.sampled_from(
                                             ["limit", "request", "cpu", "memory", "to",
                                              "container", "force", "name", "role",
                                              "namespaces"]), inner, max_size=3)),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 50_000 + b"]" * 50_000, b"1" * 5000, b"{\"to\": \"\xff\"}",
                     b"app: " + b"x" * (1 << 20)]),
)
content_types = st.sampled_from([None, "application/json", "application/yaml",
                                 "text/plain; charset=latin-1", "text/plain; charset=nope",
                                 "multipart/form-data; boundary=x"])


def test_nothing_but_4xx_whatever_is_sent(master: Master) -> None:
    statuses: dict[int, int] = {}

    @settings(max_examples=CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(paths, bodies, content_types)
    def one(route: tuple[str, str], body: bytes | None, content_type: str | None) -> None:
        method, path = route
        headers = {"Content-Type": content_type} if content_type else {}
        status, answer = master.call(method, path, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert 200 <= status < 500, (method, path, (body or b"")[:200], status, answer[:300])
        if status >= 400:
            assert "error" in json.loads(answer), answer[:300]

    one()
    print(f"API fuzz: {sum(statuses.values())} requests, answers by status {statuses}")
    assert sum(statuses.values()) >= CASES
    assert master.call("GET", "/healthz")[0] == 200
    assert master.call("GET", "/v1/apps")[0] == 200
    assert master.proc.poll() is None
