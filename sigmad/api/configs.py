"""The API's config writes: a new version (create, apply, edit, rollback) and delete, each
checked against the state cache and written as one guarded transaction.

Invariants:
- every check happens before anything is written (names, the format, 1 MiB, the apps that
  use it); a refused change writes nothing;
- a new version, its head, the versions it pushes out (sigmad.configs.kept) and every app
  that follows the config's latest version are one transaction: an app's resolved map
  (`AppRecord.configs`) and its generation move with the version, so no app sees a head
  its record does not know. A config read into the environment (`env_from`) also bumps the
  app's template generation (its containers are made anew); a mounted one does not (its
  instances are re-pinned and reload: sigmad.control.reconcile, sigmad.control.drive);
- a config used by any app is never deleted (409 naming the apps).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sigmad import configs, records
from sigmad.api.audit import OnMain
from sigmad.api.auth import caller
from sigmad.configs import ConfigHead, ConfigVersion
from sigmad.control import reloads
from sigmad.control.rollout import Revision
from sigmad.errors import Conflict, NotFound, SpecError
from sigmad.models import AppRecord, now
from sigmad.spec import MAX_NAME, NAME_RE, shown
from sigmad.state.cache import APPS, CONFIG_HEADS, CONFIGS, Cache
from sigmad.state.writes import Change, Writes, commit
from sigmad.store import MAX_TXN_OPS, Guard, Op, Store, Versioned

log = logging.getLogger(__name__)


@dataclass
class ConfigResult:
    """What a config write did (or, dry run, would do)."""

    config: str  # ns/name
    action: str  # created | updated | unchanged | deleted
    version: int
    apps: list[str] = field(default_factory=list)  # apps that follow it (a new revision each)
    instances: list[str] = field(default_factory=list)  # instances that take the new version
    dropped: list[int] = field(default_factory=list)  # versions no longer kept
    dry_run: bool = False


def check_name(path: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not NAME_RE.fullmatch(value):
        raise SpecError(path, f"{shown(value)} is not a valid config name (lowercase letters, "
                        f"digits and '-', at most {MAX_NAME} characters)")
    return value


def parse_body(body: dict[str, Any]) -> tuple[dict[str, str], str, str]:
    """(files, format, comment) of a new version's JSON body."""
    fmt = body.get("format", "") or ""
    if fmt and fmt not in configs.FORMATS:
        raise SpecError("format", f"{shown(fmt)} is not one of {', '.join(configs.FORMATS)}")
    comment = body.get("comment", "") or ""
    if not isinstance(comment, str) or len(comment) > configs.MAX_COMMENT:
        raise SpecError("comment", f"must be text of at most {configs.MAX_COMMENT} characters")
    unknown = sorted(set(body) - {"files", "format", "comment"})
    if unknown:
        raise SpecError(unknown[0], "unknown field (a config body has files, format, comment)")
    return configs.check_files(body.get("files"), fmt), fmt, comment


class ConfigWrites:
    """The config calls of the API against one store and its cache."""

    def __init__(self, store: Store, cache: Cache) -> None:
        self.store = store
        self.cache = cache
        self.keys = store.keys
        self.writes = Writes(store.keys)

    def head(self, namespace: str, name: str) -> Versioned[ConfigHead]:
        v: Versioned[ConfigHead] | None = self.cache.get(
            CONFIG_HEADS, self.keys.config_head(namespace, name))
        if v is None:
            raise NotFound(f"config {namespace}/{name} not found: see 'sigmactl config get'")
        return v

    def version(self, namespace: str, name: str, version: int) -> ConfigVersion:
        v: Versioned[ConfigVersion] | None = self.cache.get(
            CONFIGS, self.keys.config_version(namespace, name, version))
        if v is None:
            kept = self.head(namespace, name).value.versions
            raise NotFound(f"config {namespace}/{name} has no version {version} (kept: "
                           f"{', '.join(map(str, kept))})")
        return v.value

    def users(self, namespace: str, name: str) -> list[str]:
        return configs.users((v.value.spec for v in self.cache.apps().values()), namespace,
                             name)

    async def put(self, namespace: str, name: str, files: dict[str, str], fmt: str,
                  comment: str, author: str, dry_run: bool) -> ConfigResult:
        """A new version of `namespace/name` (the config is made by its first), unless it
        equals the latest (then nothing is written: "unchanged")."""
        key = self.keys.config_head(namespace, name)
        current: Versioned[ConfigHead] | None = self.cache.get(CONFIG_HEADS, key)
        sha = configs.checksum(files)
        ref = f"{namespace}/{name}"
        if current is not None:
            latest = self.cache.get(CONFIGS, self.keys.config_version(
                namespace, name, current.value.latest))
            if latest is not None and latest.value.sha256 == sha and \
                    latest.value.format == fmt:
                return ConfigResult(ref, "unchanged", current.value.latest, dry_run=dry_run)
        head = current.value if current else ConfigHead(namespace, name, created=now())
        number = head.latest + 1
        pins = [v.value.configs for v in self.cache.apps().values()
                if v.value.spec.namespace == namespace]
        pins += [i.value.configs for i in self.cache.instances().values()
                 if i.value.namespace == namespace]
        pins += [i.value.configs_have for i in self.cache.instances().values()
                 if i.value.namespace == namespace]
        pins += [v.value.configs_from for v in self.cache.apps().values()
                 if v.value.spec.namespace == namespace]  # (what a revert goes back to)
        spec_pins = {c.version for v in self.cache.apps().values()
                     if v.value.spec.namespace == namespace
                     for c in v.value.spec.configs if c.name == name and c.version}
        keep, dropped = configs.kept(head.versions, number, configs.pinned(pins, name) |
                                     spec_pins)
        new_head = ConfigHead(namespace, name, number, keep, head.created, now())
        record = ConfigVersion(namespace, name, number, files, sha, fmt, author, comment, now())
        change = Change([Guard(key, current.mod_revision if current else 0),
                         Guard(self.keys.config_version(namespace, name, number), 0)],
                        [Op(key, new_head),
                         Op(self.keys.config_version(namespace, name, number), record)])
        for old in dropped:
            change.ops.append(Op(self.keys.config_version(namespace, name, old), delete=True))
        apps, instances = self._followers(namespace, name, number, change)
        if len(change.ops) > MAX_TXN_OPS or len(change.guards) > MAX_TXN_OPS - 1:
            raise Conflict(f"{len(apps)} apps follow config {ref}: too many for one "
                           f"transaction (at most {MAX_TXN_OPS - 4}); pin some to a version")
        result = ConfigResult(ref, "created" if current is None else "updated", number, apps,
                              instances, dropped, dry_run)
        if dry_run:
            return result
        if not await commit(self.store, self.cache, change):
            raise Conflict(f"config {ref} (or an app that uses it) changed meanwhile: try "
                           "again")
        log.info("config %s: version %d by %s (%d apps follow it, %d versions dropped)",
                 ref, number, author or "?", len(apps), len(dropped))
        return result

    def _followers(self, namespace: str, name: str, number: int,
                   change: Change) -> tuple[list[str], list[str]]:
        """Add to `change` the new record of every app that follows `name`'s latest version;
        (those apps, their instances)."""
        apps, instances = [], []
        for v in sorted(self.cache.apps().values(), key=lambda v: v.key):
            spec = v.value.spec
            if spec.namespace != namespace or configs.used_names(spec).get(name, -1) != 0:
                continue
            old = v.value
            resolved = {**old.configs, name: number}
            template = old.template_generation
            if configs.env_changed(spec, old.configs, resolved):
                template = old.generation + 1
            back, halt = reloads.carried(old, resolved, (
                i.value.configs for i in self.cache.instances_of(spec.key).values()))
            rec = AppRecord(spec, old.generation + 1, template, old.created, now(), resolved,
                            back, halt)
            change.guards.append(Guard(v.key, v.mod_revision))
            change.ops.append(Op(v.key, rec))
            if template != old.template_generation:  # (older revisions go at the next apply)
                for more in (self.writes.revision(spec, Revision(template, spec, resolved,
                                                                 now())),
                             self.writes.start_rollout(old, rec)):
                    change.guards += more.guards  # (in place: the caller's change)
                    change.ops += more.ops
            apps.append(spec.key)
            instances += sorted(i.value.key for i in self.cache.instances_of(spec.key).values())
        return apps, instances

    async def rollback(self, namespace: str, name: str, to: int, author: str,
                       dry_run: bool) -> ConfigResult:
        """A new version with the files of version `to` (default: the one before the latest
        kept)."""
        head = self.head(namespace, name).value
        if not to:
            older = [v for v in head.versions if v < head.latest]
            if not older:
                raise Conflict(f"config {namespace}/{name} has no version before "
                               f"{head.latest} to roll back to")
            to = older[-1]
        if to not in head.versions:
            raise SpecError("to", f"config {namespace}/{name} has no version {to} (kept: "
                            f"{', '.join(map(str, head.versions))})")
        old = self.version(namespace, name, to)
        return await self.put(namespace, name, dict(old.files), old.format,
                              f"rollback to version {to}", author, dry_run)

    async def delete(self, namespace: str, name: str) -> ConfigResult:
        """Delete a config and its versions; 409 naming the apps while any uses it."""
        v = self.head(namespace, name)
        using = self.users(namespace, name)
        if using:
            raise Conflict(f"config {namespace}/{name} is in use by {', '.join(using)}: "
                           "remove it from their specs first")
        ops = [Op(v.key, delete=True)]
        ops += [Op(self.keys.config_version(namespace, name, n), delete=True)
                for n in v.value.versions]
        apps = [Guard(a.key, a.mod_revision) for a in self.cache.apps().values()
                if a.value.spec.namespace == namespace]
        guards = [Guard(v.key, v.mod_revision)]
        if len(apps) < MAX_TXN_OPS - 2:  # no app of the namespace took it up meanwhile
            guards += apps
        if not await commit(self.store, self.cache, Change(guards, ops)):
            raise Conflict(f"config {namespace}/{name} changed meanwhile: try again")
        log.info("config %s/%s deleted", namespace, name)
        return ConfigResult(f"{namespace}/{name}", "deleted", v.value.latest)


def resolve_for(cache: Cache, keys: Any, specs: list[Any]) -> dict[str, dict[str, int]]:
    """`ns/app` → the config versions each spec resolves to now (SpecError naming the field
    of a config or version that does not exist)."""
    out: dict[str, dict[str, int]] = {}
    for s in specs:
        heads: dict[str, ConfigHead] = {}
        for name in configs.used_names(s):
            v = cache.get(CONFIG_HEADS, keys.config_head(s.namespace, name))
            if v is not None:
                heads[name] = v.value
        out[s.key] = configs.resolve(s, heads)
    return out


def config_guards(cache: Cache, keys: Any, spec: Any) -> Change:
    """Guards on the heads of the configs `spec` uses, as resolved: an app is never written
    with a version map older than a head a concurrent config write made."""
    guards = []
    for name in configs.used_names(spec):
        v = cache.get(CONFIG_HEADS, keys.config_head(spec.namespace, name))
        guards.append(Guard(keys.config_head(spec.namespace, name), v.mod_revision if v else 0))
    return Change(guards, [])


def app_uses(cache: Cache) -> dict[str, list[str]]:
    """`ns/config` → the apps using it (for listings)."""
    out: dict[str, list[str]] = {}
    for v in cache.table(APPS).values():
        spec = v.value.spec
        for name in configs.used_names(spec):
            out.setdefault(f"{spec.namespace}/{name}", []).append(spec.key)
    return out


def version_view(v: ConfigVersion, files: bool) -> dict[str, Any]:
    """A version as the API shows it: with its files, or with their names and sizes."""
    out: dict[str, Any] = records.to_dict(v)
    if not files:
        out["files"] = {n: len(t.encode()) for n, t in sorted(v.files.items())}
    return out


class ConfigApi:
    """/v1/configs: list, get, history, one version, a new version, rollback, delete. Reads
    come from the cache; writes run on the cache's loop (`on_main`) through ConfigWrites.
    Operators may change configs of their namespaces only (sigmad.tokens.SCOPED)."""

    def __init__(self, store: Store, cache: Cache, on_main: OnMain,
                 read_body: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> None:
        self.cache = cache
        self.keys = store.keys
        self.writes = ConfigWrites(store, cache)
        self.main = on_main
        self.read_body = read_body

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/configs", self.list_all)
        router.add_get("/v1/configs/{ns}/{name}", self.get)
        router.add_post("/v1/configs/{ns}/{name}", self.put)
        router.add_delete("/v1/configs/{ns}/{name}", self.delete)
        router.add_get("/v1/configs/{ns}/{name}/versions", self.history)
        router.add_get("/v1/configs/{ns}/{name}/versions/{version}", self.version)
        router.add_post("/v1/configs/{ns}/{name}/rollback", self.rollback)

    def _path(self, request: web.Request) -> tuple[str, str]:
        return (check_name("namespace", request.match_info["ns"]),
                check_name("name", request.match_info["name"]))

    def _view(self, head: ConfigHead, uses: dict[str, list[str]]) -> dict[str, Any]:
        out: dict[str, Any] = records.to_dict(head)
        latest = self.cache.get(CONFIGS, self.keys.config_version(head.namespace, head.name,
                                                                   head.latest))
        out["format"] = latest.value.format if latest else ""
        out["sha256"] = latest.value.sha256 if latest else ""
        out["used_by"] = uses.get(f"{head.namespace}/{head.name}", [])
        return out

    async def list_all(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        uses = app_uses(self.cache)
        heads = sorted((v.value for v in list(self.cache.table(CONFIG_HEADS).values())
                        if not namespace or v.value.namespace == namespace),
                       key=lambda h: (h.namespace, h.name))
        return web.json_response({"items": [self._view(h, uses) for h in heads]})

    async def get(self, request: web.Request) -> web.Response:
        """The head, the latest version with its files, and the apps that use it."""
        ns, name = self._path(request)
        head = self.writes.head(ns, name).value
        out = self._view(head, app_uses(self.cache))
        out["latest_version"] = version_view(self.writes.version(ns, name, head.latest), True)
        out["instances"] = self._instances(ns, name)
        out["rollouts"] = self._rollouts(ns, name)
        return web.json_response(out)

    def _rollouts(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Each app that mounts the config: the version it pins, the one before, and its
        config rollout (sigmad.control.reloads.status) with why it failed, if it did."""
        out = []
        for app in app_uses(self.cache).get(f"{namespace}/{name}", []):
            v = self.cache.app(app)
            if v is None or all(c.name != name for c in v.value.spec.configs):
                continue
            rec = v.value
            out.append({"app": app, "version": rec.configs.get(name, 0),
                        "from": rec.configs_from.get(name, 0),
                        "state": reloads.status(rec, (i.value for i in
                                                      self.cache.instances_of(app).values())),
                        "reason": rec.configs_halt})
        return out

    def _instances(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Each instance that uses the config: the version it pins and the one it has."""
        out = []
        for app in app_uses(self.cache).get(f"{namespace}/{name}", []):
            for v in self.cache.ordered(app):
                inst = v.value
                out.append({"instance": inst.key, "node": inst.node,
                            "pinned": inst.configs.get(name, 0),
                            "has": inst.configs_have.get(name, 0)})
        return out

    async def history(self, request: web.Request) -> web.Response:
        """Every kept version, newest first, without file contents."""
        ns, name = self._path(request)
        head = self.writes.head(ns, name).value
        found = [self.cache.get(CONFIGS, self.keys.config_version(ns, name, n))
                 for n in reversed(head.versions)]
        return web.json_response({"items": [version_view(v.value, False) for v in found
                                            if v is not None]})

    async def version(self, request: web.Request) -> web.Response:
        ns, name = self._path(request)
        raw = request.match_info["version"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 10:
            raise SpecError("version", f"{shown(raw)} is not a version number")
        return web.json_response(version_view(self.writes.version(ns, name, int(raw)), True))

    async def put(self, request: web.Request) -> web.Response:
        """A new version from `{"files": {NAME: TEXT}, "format", "comment"}` (`?dry_run=true`:
        checked, and the apps and instances it would touch listed, nothing written)."""
        ns, name = self._path(request)
        files, fmt, comment = parse_body(await self.read_body(request))
        result = await self.main(self.writes.put(ns, name, files, fmt, comment,
                                                 caller(request).name, _dry(request)))
        return web.json_response(records.to_dict(result),
                                 status=201 if result.action == "created" else 200)

    async def rollback(self, request: web.Request) -> web.Response:
        """A new version with the files of version `to` (default: the previous one)."""
        ns, name = self._path(request)
        body = await self.read_body(request)
        to = body.get("to", 0)
        if isinstance(to, bool) or not isinstance(to, int) or to < 0:
            raise SpecError("to", "must be a version number")
        unknown = sorted(set(body) - {"to"})
        if unknown:
            raise SpecError(unknown[0], "unknown field (a rollback body has only `to`)")
        result = await self.main(self.writes.rollback(ns, name, to, caller(request).name,
                                                      _dry(request)))
        return web.json_response(records.to_dict(result))

    async def delete(self, request: web.Request) -> web.Response:
        ns, name = self._path(request)
        result = await self.main(self.writes.delete(ns, name))
        return web.json_response(records.to_dict(result))


def _dry(request: web.Request) -> bool:
    return request.query.get("dry_run", "").lower() in ("1", "true", "yes")
