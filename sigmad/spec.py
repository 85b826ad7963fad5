"""The app spec: its typed shape and the validating parser for YAML/JSON input.

Validation happens before anything is written: every error names the field path and the
reason, e.g. `containers[0].resources.limit.memory: "8GG" is not a size`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from sigmad.errors import SpecError
from sigmad.units import parse_cpu, parse_size

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
MAX_NAME = 40
MAX_REPLICAS = 10_000
RESTART_POLICIES = ("always", "on-failure", "never")
# Fields of DESIGN.md's app shape that this version parses but cannot act on yet: rejected
# with a clear message rather than silently ignored.
NOT_YET = {
    "network", "volumes", "configs", "migration", "depends_on",
    "containers[].ready", "placement.spread", "placement.strategy",
}


@dataclass
class Resources:
    """CPU in millicores and memory in bytes; 0 means best effort (request) or no cap (limit)."""

    cpu_m: int = 0
    memory: int = 0


@dataclass
class ResourceSpec:
    request: Resources = field(default_factory=Resources)
    limit: Resources = field(default_factory=Resources)


@dataclass
class ContainerSpec:
    name: str
    image: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    resources: ResourceSpec = field(default_factory=ResourceSpec)


@dataclass
class Placement:
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class AppSpec:
    app: str
    containers: list[ContainerSpec]
    namespace: str = "default"
    replicas: int = 1
    placement: Placement = field(default_factory=Placement)
    restart: str = "always"

    @property
    def key(self) -> str:
        """`namespace/app`."""
        return f"{self.namespace}/{self.app}"

    def request(self) -> Resources:
        """What one instance reserves from the pool: the sum over its containers."""
        return Resources(
            sum(c.resources.request.cpu_m for c in self.containers),
            sum(c.resources.request.memory for c in self.containers),
        )


class Fields:
    """A mapping being validated: takes known keys, then rejects whatever is left."""

    def __init__(self, path: str, value: object, generic: str) -> None:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be a mapping, got {_kind(value)}")
        self.path = path
        self.generic = generic
        self.left = dict(value)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, default: Any = None, required: bool = False) -> Any:
        if key not in self.left:
            if required:
                raise SpecError(self.at(key), "is required")
            return default
        return self.left.pop(key)

    def done(self) -> None:
        for key in self.left:
            generic = f"{self.generic}.{key}" if self.generic else str(key)
            if generic in NOT_YET:
                raise SpecError(self.at(key), "is not supported by this version of sigma yet")
            raise SpecError(self.at(key), "unknown field")


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _name(path: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > MAX_NAME:
        raise SpecError(
            path,
            f"{value!r} is not a valid name (lowercase letters, digits and '-', "
            f"at most {MAX_NAME} characters, starting and ending with a letter or digit)",
        )
    return value


def quantity(path: str, value: object, parse: Callable[[object], int]) -> int:
    try:
        return parse(value)
    except ValueError as exc:
        raise SpecError(path, str(exc)) from None


def _resources(path: str, value: object) -> Resources:
    fields = Fields(path, value or {}, "")
    res = Resources(
        quantity(fields.at("cpu"), fields.take("cpu", 0), parse_cpu),
        quantity(fields.at("memory"), fields.take("memory", 0), parse_size),
    )
    fields.done()
    return res


def _resource_spec(path: str, value: object) -> ResourceSpec:
    fields = Fields(path, value or {}, "")
    spec = ResourceSpec(
        _resources(fields.at("request"), fields.take("request")),
        _resources(fields.at("limit"), fields.take("limit")),
    )
    fields.done()
    for attr, key in (("cpu_m", "cpu"), ("memory", "memory")):
        limit, request = getattr(spec.limit, attr), getattr(spec.request, attr)
        if limit and limit < request:
            raise SpecError(
                f"{path}.limit.{key}", "is below the request (the limit is the cap; it may "
                "exceed the request but not fall under it)"
            )
    return spec


def string_map(path: str, value: object, key_re: re.Pattern[str], what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a mapping, got {_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key_re.match(key):
            raise SpecError(f"{path}.{key}", f"is not a valid {what} name")
        if isinstance(item, dict | list) or item is None:
            raise SpecError(f"{path}.{key}", f"must be a string, got {_kind(item)}")
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


def _container(path: str, value: object) -> ContainerSpec:
    fields = Fields(path, value, "containers[]")
    name = _name(fields.at("name"), fields.take("name", required=True))
    image = fields.take("image", required=True)
    if not isinstance(image, str) or not image or any(ch.isspace() for ch in image):
        raise SpecError(fields.at("image"), f"{image!r} is not an image reference")
    command = fields.take("command", [])
    if not isinstance(command, list) or not all(isinstance(a, str | int) for a in command):
        raise SpecError(fields.at("command"), "must be a list of strings, e.g. [httpd, -f]")
    spec = ContainerSpec(
        name=name,
        image=image,
        command=[str(a) for a in command],
        env=string_map(fields.at("env"), fields.take("env"), ENV_RE, "environment variable"),
        resources=_resource_spec(fields.at("resources"), fields.take("resources")),
    )
    fields.done()
    return spec


def validate(doc: object) -> AppSpec:
    """An AppSpec from one parsed YAML/JSON document, or SpecError naming the bad field."""
    fields = Fields("", doc, "")
    app = _name("app", fields.take("app", required=True))
    namespace = _name("namespace", fields.take("namespace", "default"))
    replicas = fields.take("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not (
        0 <= replicas <= MAX_REPLICAS
    ):
        raise SpecError("replicas", f"{replicas!r} is not a whole number from 0 to {MAX_REPLICAS}")
    raw = fields.take("containers", required=True)
    if not isinstance(raw, list) or not raw:
        raise SpecError("containers", "must be a non-empty list")
    containers = [_container(f"containers[{i}]", c) for i, c in enumerate(raw)]
    seen: set[str] = set()
    for i, c in enumerate(containers):
        if c.name in seen:
            raise SpecError(f"containers[{i}].name", f"{c.name!r} is used twice")
        seen.add(c.name)
    placement = Fields("placement", fields.take("placement") or {}, "placement")
    labels = string_map("placement.labels", placement.take("labels"), LABEL_RE, "label")
    placement.done()
    restart = fields.take("restart", "always")
    if restart not in RESTART_POLICIES:
        raise SpecError("restart", f"{restart!r} is not one of {', '.join(RESTART_POLICIES)}")
    fields.done()
    return AppSpec(
        app=app, namespace=namespace, replicas=replicas, containers=containers,
        placement=Placement(labels), restart=restart,
    )


def parse(text: str) -> list[AppSpec]:
    """Every app in a YAML (or JSON) text of one or more documents; all valid or SpecError."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not docs:
        raise SpecError("", "the file holds no app spec")
    specs = []
    for n, doc in enumerate(docs):
        try:
            specs.append(validate(doc))
        except SpecError as exc:
            if len(docs) > 1:
                exc.message = f"document {n + 1}: {exc.message}"
            raise
    keys = [s.key for s in specs]
    for key in keys:
        if keys.count(key) > 1:
            raise SpecError("app", f"{key} appears more than once in the file")
    return specs
