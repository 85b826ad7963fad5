"""The config center's records and pure decisions (issue 13): versioned files an app mounts
read-only (`configs:`) or reads into its environment (`env_from:`).

Keys (sigmad.store.Keys): `configs/{ns}/{name}/{version}` holds one immutable ConfigVersion,
`config-heads/{ns}/{name}` the ConfigHead (latest version, versions kept), and
`config-held/{node}/{ns}/{app}-{index}` what a node's agent has delivered for an instance
(ConfigsHeld, written by that agent only).

Invariants:
- a version is never rewritten: a change (or a rollback) is a new version number;
- a version holds at most MAX_VERSION_BYTES of file content and MAX_FILES files, each named
  by FILE_RE (never `..x`: the agent's own entries start with `..`), and its declared format
  parses (`check_format` names the file and the line);
- at most KEEP versions are kept; an older one still pinned (by an app's `version: N`, an
  app's resolved map or an instance) is kept beyond KEEP until nothing pins it;
- every function here is pure: it reads records and returns values or plans; sigmad.api.configs
  writes them.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sigmad.errors import SpecError
from sigmad.spec import FILE_RE, AppSpec, load, shown

KEEP = 20  # versions kept per config
MAX_VERSION_BYTES = 1 << 20  # file content per version (UTF-8 bytes, summed)
MAX_FILES = 64
MAX_FILE_NAME = 128
MAX_COMMENT = 512
MAX_ENV_VARS = 1000
FORMATS = ("yaml", "json", "ini", "env")
ENV_LINE = re.compile(r"(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)")


@dataclass(slots=True)
class ConfigVersion:
    """The value of `configs/{ns}/{name}/{version}`: immutable once written."""

    namespace: str
    name: str
    version: int
    files: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    format: str = ""  # "" = not checked
    author: str = ""
    comment: str = ""
    created: float = 0.0


@dataclass(slots=True)
class ConfigHead:
    """The value of `config-heads/{ns}/{name}`: the newest version and those kept."""

    namespace: str
    name: str
    latest: int = 0
    versions: list[int] = field(default_factory=list)  # kept, oldest first
    created: float = 0.0
    updated: float = 0.0


@dataclass(slots=True)
class ConfigsHeld:
    """The value of `config-held/{node}/{ns}/{app}-{index}`: the config versions the node's
    agent has in place for the instance (files written, `..data` swapped)."""

    instance: str  # ns/app-index
    node: str
    versions: dict[str, int] = field(default_factory=dict)
    updated: float = 0.0


def delivered_dir(root: str, namespace: str, instance: str, name: str) -> str:
    """The host directory holding config `name` for instance `instance` (`APP-INDEX`) under
    a node's config root (`Node.config_dir`): the agent writes it, containers bind it."""
    return f"{root.rstrip('/')}/{namespace}/{instance}/{name}"


def checksum(files: Mapping[str, str]) -> str:
    """sha256 of a version's files (names and contents, length-prefixed, in name order): the
    agent compares what it has on disk against it."""
    digest = hashlib.sha256()
    for name in sorted(files):
        for part in (name.encode(), files[name].encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def check_files(value: object, fmt: str) -> dict[str, str]:
    """The files of a new version from a request body's `files` (name → text), each checked
    against `fmt` ("" = any text); SpecError naming `files` or `files.NAME` otherwise."""
    if not isinstance(value, dict) or not value:
        raise SpecError("files", "must be a non-empty mapping of file name to text")
    if len(value) > MAX_FILES:
        raise SpecError("files", f"{len(value)} files: at most {MAX_FILES} per config")
    total = 0
    files: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or len(name) > MAX_FILE_NAME or \
                not FILE_RE.fullmatch(name) or name.startswith(".."):
            raise SpecError(f"files.{shown(name, 40)}", "is not a file name (letters, digits, "
                            f"'.', '_', '-', at most {MAX_FILE_NAME} characters, not starting "
                            "with '.', '-' or '..')")
        if not isinstance(text, str):
            raise SpecError(f"files.{name}", f"must be text, got {type(text).__name__}")
        total += len(text.encode())
        if total > MAX_VERSION_BYTES:
            raise SpecError("files", f"more than {MAX_VERSION_BYTES >> 20} MiB of content: a "
                            "config version holds at most 1 MiB (keep large data elsewhere)")
        if fmt:
            check_format(f"files.{name}", text, fmt)
        files[name] = text
    return files


def check_format(path: str, text: str, fmt: str) -> None:
    """SpecError at `path` unless `text` parses as `fmt` (yaml | json | ini | env)."""
    if fmt == "json":
        try:
            json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise SpecError(path, f"is not valid JSON: {exc}") from None
    elif fmt == "yaml":
        try:
            load(text)
        except SpecError as exc:
            raise SpecError(path, exc.message.removeprefix("spec: ")) from None
    elif fmt == "ini":
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=path)
        except configparser.Error as exc:
            raise SpecError(path, f"is not valid INI: {str(exc).splitlines()[0]}") from None
    elif fmt == "env":
        env_vars(path, text)
    else:
        raise SpecError("format", f"{shown(fmt)} is not one of {', '.join(FORMATS)}")


def env_vars(path: str, text: str) -> dict[str, str]:
    """The KEY=VALUE lines of an env file (blank lines and `#` comments skipped; a value in
    matching single or double quotes is unquoted); SpecError naming the line otherwise."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = ENV_LINE.fullmatch(line)
        if match is None:
            raise SpecError(path, f"line {number}: {shown(line, 40)} is not KEY=VALUE")
        value = match["value"]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if "\x00" in value:
            raise SpecError(path, f"line {number}: a value may not hold a NUL character")
        out[match["key"]] = value
        if len(out) > MAX_ENV_VARS:
            raise SpecError(path, f"more than {MAX_ENV_VARS} variables")
    return out


def used_names(spec: AppSpec) -> dict[str, int]:
    """Every config an app uses, with the version its spec asks for (0 = latest)."""
    wanted = {c.name: c.version for c in spec.configs}
    for e in spec.env_from:
        wanted.setdefault(e.config, 0)
    return wanted


def resolve(spec: AppSpec, heads: Mapping[str, ConfigHead]) -> dict[str, int]:
    """The version of each config `spec` uses (`heads`: name → head in the app's namespace);
    SpecError naming the field whose config or version does not exist."""
    out: dict[str, int] = {}
    for i, c in enumerate(spec.configs):
        out[c.name] = _version(f"configs[{i}]", c.name, c.version, heads, spec.namespace)
    for i, e in enumerate(spec.env_from):
        if e.config not in out:
            out[e.config] = _version(f"env_from[{i}]", e.config, 0, heads, spec.namespace,
                                     "config")
    return out


def _version(path: str, name: str, version: int, heads: Mapping[str, ConfigHead],
             namespace: str, name_field: str = "name") -> int:
    head = heads.get(name)
    if head is None:
        raise SpecError(f"{path}.{name_field}", f"config {namespace}/{name} does not exist: "
                        f"create it first (sigmactl config create {name} -n {namespace} "
                        "--from-file FILE)")
    if not version:
        return head.latest
    if version not in head.versions:
        kept = ", ".join(map(str, head.versions))
        raise SpecError(f"{path}.version", f"config {namespace}/{name} has no version "
                        f"{version} (kept: {kept})")
    return version


def env_changed(spec: AppSpec, old: Mapping[str, int], new: Mapping[str, int]) -> bool:
    """Whether a config read into the environment (`env_from`) changes version: the
    containers must then be made anew (an environment is fixed at create)."""
    return any(old.get(e.config) != new.get(e.config) for e in spec.env_from)


def users(apps: Iterable[AppSpec], namespace: str, name: str) -> list[str]:
    """The apps (`ns/app`, sorted) whose spec uses config `namespace/name`."""
    return sorted(a.key for a in apps if a.namespace == namespace and name in used_names(a))


def pinned(versions: Iterable[Mapping[str, int]], name: str) -> set[int]:
    """The versions of config `name` that any of `versions` (name → version maps: apps'
    resolved maps, instances' pins) holds."""
    return {m[name] for m in versions if name in m}


def kept(head_versions: list[int], new: int, in_use: set[int]) -> tuple[list[int], list[int]]:
    """(versions kept, versions dropped) once `new` is added: the newest KEEP, plus any
    older one still `in_use`."""
    every = [*head_versions, new]
    recent = set(every[-KEEP:])
    keep = [v for v in every if v in recent or v in in_use]
    return keep, [v for v in every if v not in keep]


@dataclass(frozen=True, slots=True)
class Change:
    """What `on_change` asks of a running instance when config `name` moves to `version`."""

    name: str
    version: int
    action: str  # none | restart | signal:SIG


def reloads(spec: AppSpec, wanted: Mapping[str, int], held: Mapping[str, int],
            have: Mapping[str, int]) -> tuple[dict[str, int], list[Change]]:
    """For an instance with running containers: the versions it has once the agent's
    delivery (`held`) is taken (`have` updated with every pinned version `wanted` that is
    held), and the on_change actions that needs, one per mounted config whose version moves.
    A config pinned but not held yet keeps the version it had."""
    actions = {c.name: c.on_change for c in spec.configs}
    now = dict(have)
    changes: list[Change] = []
    for name, version in wanted.items():
        if held.get(name) != version or have.get(name) == version:
            continue
        now[name] = version
        if name in have and name in actions:
            changes.append(Change(name, version, actions[name]))
    for name in [n for n in now if n not in wanted]:
        del now[name]
    return now, changes


def missing(wanted: Mapping[str, int], held: Mapping[str, int]) -> list[str]:
    """`name vN` of each pinned version the agent does not have in place yet."""
    return [f"{n} v{v}" for n, v in sorted(wanted.items()) if held.get(n) != v]


def env_of(spec: AppSpec, pins: Mapping[str, int],
           versions: Mapping[tuple[str, int], ConfigVersion]) -> tuple[dict[str, str], str]:
    """The environment `env_from` gives a container of an instance pinned to `pins`
    (`versions`: (name, version) → record), or ({}, why it cannot be made yet)."""
    env: dict[str, str] = {}
    for e in spec.env_from:
        v = versions.get((e.config, pins.get(e.config, 0)))
        if v is None:
            return {}, f"config {e.config} v{pins.get(e.config, 0)} is not known yet"
        text = v.files.get(e.file)
        if text is None:
            return {}, (f"env_from: config {e.config} v{v.version} has no file {e.file} "
                        f"(it has {', '.join(sorted(v.files))})")
        try:
            env.update(env_vars(f"{e.config}/{e.file}", text))
        except SpecError as exc:
            return {}, f"env_from: {exc.message}"
    return env, ""
