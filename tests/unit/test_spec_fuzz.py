"""Fuzz of the spec parser (sigmad.spec.parse): whatever the text, nothing but SpecError
escapes it, and what parses is a list of AppSpec.

Texts are drawn four ways: specs that are mostly right with random values in some fields,
random documents made of the spec's field names, several documents in one file, and plain
random text; as YAML or JSON, often with YAML's sharp edges spliced in (anchors, aliases,
merge keys, tags, control characters, long numbers, deep brackets). Documents are built by
a seeded random generator (Hypothesis draws the seed: fast, and a failure names the seed
that reproduces it); plain text is drawn by Hypothesis itself."""

from __future__ import annotations

import json
import random
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigmad.errors import SpecError
from sigmad.spec import AppSpec, parse

CASES = 5000
FIELDS = [
    "app", "namespace", "replicas", "containers", "name", "image", "command", "env",
    "resources", "request", "limit", "cpu", "memory", "ready", "tcp", "http", "port", "exec",
    "timeout", "placement", "labels", "expressions", "key", "operator", "values", "spread",
    "strategy", "network", "mode", "ports", "container", "protocol", "ip", "restart",
    "depends_on", "migration", "volumes", "configs", "<<",
]
WORDS = ["web", "busybox", "1", "500m", "2Gi", "10.244.0.1", "overlay", "host-compat", "In",
         "Exists", "tcp", "/", "0", "always", "auto", "a-b", "web\n", "Busybox", "-1", "1e999",
         "", " ", "web-\u00b2", "\u0663", "x" * 100]
TOKENS = ["&a ", "*a", "*b", "<<: *a\n", "!!int ", "!!float ", "!!binary ", "!!set ",
          "!!omap ", "!!timestamp ", "!!python/object:os.system ", "[", "]", "{", "}", "\t",
          "---\n", "...\n", "? ", ": ", "- ", "%YAML 1.1\n", "%TAG ! x\n", "\x00", "\ufeff",
          "\x85", "\u2028", '"', "'", "|\n", ">-\n", "#", "\\", "9" * 30, ".inf", ".nan",
          "0x1F", "0o7", "1:2:3", "~", "\n  ", "\n", "&a [*a]", "\u00b2", "\udc80",
          "[" * 40, "- " * 30]


def scalar(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 8080, 65536, 10_000, 10_001, 2**63, 10**30])
    if kind == 3:
        return rng.choice([0.5, 1e300, -0.0, float("inf"), float("nan")])
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(8)))
    return rng.choice(WORDS)


def anything(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth >= 3 or roll < 0.5:
        return scalar(rng)
    if roll < 0.75:
        return [anything(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS) if rng.random() < 0.8 else str(scalar(rng)):
            anything(rng, depth + 1) for _ in range(rng.randrange(5))}


def maybe(rng: random.Random, good: Any) -> Any:
    """Mostly the good value (15 times in 16, a fresh copy: never shared, so never dumped as
    an alias), sometimes anything."""
    return json.loads(json.dumps(good)) if rng.random() < 15 / 16 else anything(rng)


def some(rng: random.Random, fields: dict[str, Any]) -> dict[str, Any]:
    """Each field with a chance of one half."""
    return {k: maybe(rng, v) for k, v in fields.items() if rng.random() < 0.5}


def container(rng: random.Random) -> dict[str, Any]:
    doc = {"name": maybe(rng, rng.choice(["main", "side", "a-1"])),
           "image": maybe(rng, rng.choice(["busybox", "reg:5000/sigma/busybox:1"]))}
    doc.update(some(rng, {
        "command": ["httpd", "-f"], "env": {"MODE": "prod"},
        "resources": {"request": {"cpu": "100m", "memory": "64Mi"},
                      "limit": {"cpu": "1", "memory": "128Mi"}},
        "ready": rng.choice([{"tcp": 8080}, {"http": "/", "port": 80}, {"exec": ["true"]}]),
    }))
    return doc


def spec_doc(rng: random.Random, app: str) -> dict[str, Any]:
    doc = {"app": maybe(rng, app), "replicas": maybe(rng, 2),
           "containers": maybe(rng, [container(rng) for _ in range(1 + rng.randrange(2))])}
    doc.update(some(rng, {
        "namespace": "default", "restart": "on-failure", "migration": "manual",
        "depends_on": ["db"],
        "placement": {"labels": {"zone": "a"}, "spread": "zone", "strategy": "binpack",
                      "expressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
        "network": {"mode": "host-compat", "ip": ["10.244.0.1", "10.244.0.2"],
                    "ports": [{"name": "http"}]},
    }))
    return doc


def text_of(seed: int) -> str:
    """One text to parse, made from `seed` alone."""
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.55:
        docs = [spec_doc(rng, "web")]
    elif roll < 0.75:
        docs = [spec_doc(rng, f"app{i}") for i in range(2 + rng.randrange(3))]
    else:
        docs = [anything(rng)]
    if len(docs) == 1 and rng.random() < 0.3:
        text = json.dumps(docs[0], default=str)
    else:
        text = "---\n".join(yaml.dump(d, Dumper=yaml.CSafeDumper, allow_unicode=True)
                            for d in docs)
    for _ in range(rng.choice([0, 0, 0, 1, 2, 4])):
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(TOKENS) + text[at:]
    return text


texts = st.one_of(st.integers(0, 2**64).map(text_of), st.text(max_size=200))


def test_nothing_but_spec_error_escapes_the_parser() -> None:
    outcomes = {"parsed": 0, "refused": 0}

    @settings(max_examples=CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(texts)
    def one(text: str) -> None:
        try:
            result = parse(text)
        except SpecError as exc:
            assert exc.status == 400 and exc.message
            outcomes["refused"] += 1
        else:
            assert result and all(isinstance(s, AppSpec) for s in result)
            outcomes["parsed"] += 1

    one()
    print(f"spec fuzz: {sum(outcomes.values())} texts, {outcomes}")
    assert sum(outcomes.values()) >= CASES, outcomes
    assert outcomes["parsed"] > CASES // 20 and outcomes["refused"] > CASES // 2, outcomes
