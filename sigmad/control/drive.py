"""One instance's containers on its node's engine: ordered start, readiness, restarts, caps
kept as the spec says, and the one authoritative reason for every container end
(DESIGN.md §3).

`Runner.step` never blocks on the instance: it does what can be done now (create, start, one
readiness probe, a cap update) and leaves the rest to the next step, so one slow instance
holds up nothing. It reads the node's containers from the engine watch (never lists the
engine) and records there what it does, so the watch's echo of its own actions is no news.
The Runner changes only its working copy of the instance; the caller writes it.

Caps are desired state (the kubelet's in-place resize): a running container whose recorded
caps differ from its spec's limits gets them with a live update, same container; a cap may
appear, change or be lifted (0 = none) this way.

Configs (sigmad.configs): the instance's node agent delivers the versions the instance pins
(`Instance.configs`) and says so (`ConfigInput.held`); the Runner, which talks to engines,
does the rest: an instance without containers is not started until every pinned version is
in place on its node (so a moved instance never starts with old or missing files), and a
running one whose delivered version moved gets its configs' `on_change` (a signal to every
running container, or its containers made anew); `Instance.configs_have` then records the
versions it runs with and `reloaded_at` when. After a signal, a container with a readiness
probe counts as not ready until a probe passes again, never in the step that sent the
signal (the app has not had a moment to reload), so the instance is Starting until then;
its probe's timeout counts from the signal (sigmad.control.reloads checks the reload). The
first probe after a signal waits RELOAD_GRACE: a signal is handled when the app gets to it
(a shell's trap after its current command), and a probe before that would see the old state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sigmad import configs
from sigmad.control.containers import EngineWatch, started
from sigmad.engine import (
    LABEL_CLUSTER,
    LABEL_CONTAINER,
    LABEL_INSTANCE,
    ContainerState,
    Engine,
    cap_config,
    container_config,
    container_name,
)
from sigmad.errors import EngineError
from sigmad.models import MAX_LOG_LINES, AppRecord, ContainerStatus, Instance, Node, now
from sigmad.reasons import CLEAN_EXIT, Kill, Reason, State
from sigmad.spec import ContainerSpec, ReadyCheck, Resources
from sigmad.units import format_cpu, format_size

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0
STEADY_AFTER = 60.0  # a container that ran this long before ending resets the failure streak
PROBE_TIMEOUT = 5.0
RELOAD_GRACE = 1.0  # seconds after an on_change signal before a probe may count it ready again
Report = Callable[[str, bool], None]  # (message, warning)


def restart_backoff(streak: int) -> float:
    """Seconds to wait before restarting after `streak` quick failures in a row: 1, 2, 4 …
    capped at a minute."""
    return float(min(2 ** max(streak - 1, 0), MAX_BACKOFF))


def should_restart(policy: str, reason: str) -> bool:
    """Whether the restart policy restarts a container that ended for `reason`."""
    if policy == "always":
        return True
    return policy == "on-failure" and reason != CLEAN_EXIT


def probe_command(check: ReadyCheck) -> list[str]:
    """The command run inside the container (via the engine's exec) to probe readiness."""
    if check.exec:
        return check.exec
    if check.tcp:
        # busybox nc connects and runs `true`; other nc flavours know -z.
        return ["sh", "-c", f"nc 127.0.0.1 {check.tcp} -e true </dev/null 2>/dev/null || "
                f"nc -z 127.0.0.1 {check.tcp}"]
    url = f"http://127.0.0.1:{check.port}{check.http}"
    return ["sh", "-c", f"wget -q -O /dev/null {url} 2>/dev/null || curl -fsS -o /dev/null {url}"]


def parse_time(stamp: str) -> float:
    """Epoch seconds from Docker's RFC 3339 time with nanoseconds; 0 if unset."""
    if not stamp or stamp.startswith("0001-"):
        return 0.0
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def _same_instance(c: ContainerState, instance: str, cluster: str) -> bool:
    """Whether a container is a copy of `instance` made by this cluster: it carries this
    instance's label, and our cluster label (or, made before containers carried one, none)."""
    return c.labels.get(LABEL_INSTANCE) == instance and \
        c.labels.get(LABEL_CLUSTER, cluster) == cluster


async def fence(engine: Engine, instance: str, timeout: float) -> list[str] | None:
    """Stop every running container of `instance` (`ns/app-i`) on a lost node's `engine`,
    at once (SIGKILL: a fence does not wait for a graceful end); the ids it stopped, or None
    when the engine did not answer within `timeout` seconds (nothing is confirmed then)."""
    async def stop_all() -> list[str]:
        found = await engine.containers({LABEL_INSTANCE: instance})
        running = [c.id for c in found if c.running]
        await asyncio.gather(*(engine.stop(cid, timeout=0) for cid in running))
        return running

    try:
        return await asyncio.wait_for(stop_all(), timeout)
    except (EngineError, TimeoutError) as exc:
        log.info("%s: its lost node's engine did not fence it: %s", instance,
                 exc.message if isinstance(exc, EngineError) else f"no answer in {timeout:g}s")
        return None


@dataclass
class ConfigInput:
    """What the Runner knows of an instance's configs on its node: the versions the agent
    has in place (`held`), the environment `env_from` gives (or `wait`: why it cannot be
    made yet)."""

    held: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    wait: str = ""


class Runner:
    """Brings one instance's containers on one engine in line with its app, in spec order."""

    def __init__(self, engine: Engine, watch: EngineWatch, inst: Instance, app: AppRecord,
                 node: Node, report: Report, config_input: ConfigInput | None = None,
                 request: Resources | None = None) -> None:
        """`app`: what the instance runs (its own revision during a rolling release);
        `request`: what its app requests now (default: `app`'s)."""
        self.engine = engine
        self.watch = watch
        self.inst = inst
        self.app = app
        self.spec = app.spec
        self.node = node
        self.report = report
        self.configs = config_input or ConfigInput()
        self.request = request or app.spec.request()

    async def step(self, hold: str = "") -> None:
        """One step. `hold` (e.g. unmet depends_on) keeps an instance that has no containers
        yet from starting."""
        inst = self.inst
        found = self.watch.of(inst.key)
        owner = next((c for c in found
                      if c.labels.get(LABEL_CONTAINER) == self.spec.containers[0].name), None)
        if owner is not None and owner.running and owner.ip and owner.ip != inst.ip:
            # Made for another IP (the fixed IP changed, or before the overlay existed).
            await self.remove_all(found, Reason.killed(Kill.UPDATED))
            self._reset(State.SCHEDULED, f"replacing containers: the instance's IP is {inst.ip}")
            found = []
        if inst.generation != self.app.template_generation and inst.request == \
                self.spec.request():  # the scheduler booked the new request on this node
            await self.remove_all(found, Reason.killed(Kill.UPDATED))
            self._reset(State.SCHEDULED, f"replacing containers for generation "
                        f"{self.app.template_generation}")
            inst.generation = self.app.template_generation
            found = []
        wanted = {s.name for s in self.spec.containers}
        for stale in [c for c in found if c.labels.get(LABEL_CONTAINER) not in wanted]:
            await self._remove(stale.id)
        by_name = {c.labels.get(LABEL_CONTAINER, ""): c for c in found
                   if c.labels.get(LABEL_CONTAINER) in wanted}
        if by_name and inst.configs:
            by_name = await self._reload(by_name)
        if not by_name and not hold:
            hold = self._config_hold()
        if not by_name and (hold or not inst.ip):
            inst.state, inst.reason = State.SCHEDULED, hold or "waiting for an overlay IP"
            return
        await self._walk(by_name)
        if inst.generation == self.app.template_generation:
            await self._caps()

    def _config_hold(self) -> str:
        """Why the instance may not start yet for its configs ("" = it may); when it may,
        the versions it starts with are recorded."""
        inst = self.inst
        if not inst.configs:
            inst.configs_have = {}
            return ""
        missing = configs.missing(inst.configs, self.configs.held)
        if missing:
            return f"waiting for configs {', '.join(missing)} on {self.node.name}"
        if self.configs.wait:
            return self.configs.wait
        inst.configs_have = dict(inst.configs)
        return ""

    async def _reload(self, by_name: dict[str, ContainerState]
                      ) -> dict[str, ContainerState]:
        """Take the config versions the agent delivered: run each moved config's on_change
        and record the versions the instance now has; the containers left ({} when they
        were removed to be made anew)."""
        inst = self.inst
        have, changes = configs.reloads(self.spec, inst.configs, self.configs.held,
                                        inst.configs_have)
        if have == inst.configs_have:
            return by_name
        moved = ", ".join(f"{c.name} v{c.version}" for c in changes) or "none"
        if any(c.action == "restart" for c in changes):
            inst.configs_have, inst.reloaded_at = have, now()
            await self.remove_all(list(by_name.values()), Reason.killed(Kill.UPDATED))
            self._reset(State.SCHEDULED, f"making containers anew for configs {moved}")
            return {}
        signalled = set()
        for sig in sorted({c.action.removeprefix("signal:") for c in changes
                           if c.action.startswith("signal:")}):
            for c in by_name.values():
                if c.running:
                    await self.engine.kill(c.id, sig)
                    signalled.add(c.id)
            self.report(f"configs {moved} in place: {sig} sent", False)
        if signalled:
            inst.reloaded_at = now()
            probes = {s.name for s in self.spec.containers if s.ready is not None}
            for status in inst.containers:
                if status.name in probes and status.id in signalled:
                    status.ready = False
        if not any(c.action.startswith("signal:") for c in changes):
            self.report("configs in place: " + ", ".join(f"{n} v{v}" for n, v in
                                                         sorted(have.items())), False)
        inst.configs_have = have
        return by_name

    async def _walk(self, by_name: dict[str, ContainerState]) -> None:
        inst = self.inst
        known = {c.id: c for c in inst.containers}
        statuses: list[ContainerStatus] = []
        first_id = ""
        for index, spec in enumerate(self.spec.containers):
            c = by_name.get(spec.name)
            if c is not None and not c.running and c.status != "created":
                if not c.full:
                    c = await self.engine.inspect(c.id) or c
                if not await self._ended(index, c, by_name):
                    statuses.append(self._status(spec, c, False))
                    break
                if index == 0:  # the network owner ended: everything was removed
                    by_name = {}
                c = None
            if c is None:
                if inst.next_start > now():
                    break
                c = await self._create(spec, first_id)
                if c is None:
                    break
            if not c.running:
                await self.engine.start(c.id)
                c = started(c)
                self.watch.put(c)
                if len(self.spec.containers) > 1 or spec.ready:  # else "Running" says it
                    self.report(f"started container {spec.name} ({c.id[:12]})", False)
            first_id = first_id or c.id
            was = known.get(c.id)
            reloaded = inst.reloaded_at > parse_time(c.started_at or
                                                     (was.started_at if was else ""))
            ready = (was is not None and was.ready) or (
                not (reloaded and now() - inst.reloaded_at < RELOAD_GRACE)
                and await self._probe(spec, c, was))
            statuses.append(self._status(spec, c, ready, was))
            if not ready:
                if inst.state != State.FAILED_TO_START:
                    again = " again after its config reload" if reloaded else ""
                    inst.state, inst.reason = State.STARTING, \
                        f"waiting for {spec.name} to be ready{again}"
                break
        inst.containers = statuses
        if len(statuses) == len(self.spec.containers) and all(s.ready for s in statuses):
            if inst.state != State.RUNNING:
                self.report("all containers ready: Running", False)
            inst.state = State.RUNNING
            if inst.request == self.request:  # else the scheduler says why it waits
                inst.reason = ""
        elif inst.state not in (State.EXITED, State.FAILED, State.FAILED_TO_START):
            inst.state = State.STARTING

    def _status(self, spec: ContainerSpec, c: ContainerState, ready: bool,
                was: ContainerStatus | None = None) -> ContainerStatus:
        """What the record keeps of a container: from the engine, with what the engine's
        list does not say (start time, caps applied) kept from the record."""
        return ContainerStatus(
            name=spec.name, id=c.id, state=c.status,
            exit_code=None if c.running else c.exit_code,
            started_at=c.started_at or (was.started_at if was else ""),
            finished_at="" if c.running else c.finished_at, ready=ready,
            limit=was.limit if was is not None else spec.resources.limit,
        )

    async def _caps(self) -> None:
        """Give running containers the caps their spec asks for (see the module docstring)."""
        limits = {s.name: s.resources.limit for s in self.spec.containers}
        for status in self.inst.containers:
            want = limits.get(status.name)
            if want is None or status.limit == want or status.state != "running":
                continue
            try:
                await self.engine.update(status.id, cap_config(want, self.node.capacity))
            except EngineError as exc:
                self.inst.reason = f"caps of {status.name} not updated: {exc.message}"
                self.report(self.inst.reason, True)
                raise
            self.report(f"caps of {status.name} updated in place: {_caps_text(status.limit)} "
                        f"→ {_caps_text(want)}", False)
            status.limit = want

    async def _probe(self, spec: ContainerSpec, c: ContainerState,
                     was: ContainerStatus | None) -> bool:
        """Whether a running container is ready; a probe past its timeout fails the start."""
        if spec.ready is None:
            return True
        why = ""
        try:
            code = await self.engine.exec(c.id, probe_command(spec.ready), PROBE_TIMEOUT)
        except EngineError as exc:  # e.g. the image has no shell for a tcp/http probe
            code, why = -1, f": {exc.message}"
        if code == 0:
            self.report(f"container {spec.name} ready", False)
            return True
        begun = parse_time(c.started_at or (was.started_at if was else ""))
        begun = max(begun, self.inst.reloaded_at) if begun else 0.0  # (after a reload: since)
        if begun and now() - begun > spec.ready.timeout:
            await self._failed(Reason.failed_to_start(
                f"container {spec.name} not ready after {spec.ready.timeout:g}s{why}"))
        return False

    async def _ended(self, index: int, c: ContainerState,
                     by_name: dict[str, ContainerState]) -> bool:
        """Record a container end; True if the container (or, for the network owner, every
        container) was removed to be restarted."""
        inst = self.inst
        name = c.labels.get(LABEL_CONTAINER, "")
        reason = c.end_reason()
        if not any(t.container_id == c.id for t in inst.terminations):
            # its last lines, kept with its end: the container is removed soon
            inst.terminated(name, reason, c.id,
                            await self.engine.last_lines(c.id, MAX_LOG_LINES))
            self.report(f"container {name} ended: {reason}", reason != CLEAN_EXIT)
            ran = parse_time(c.finished_at) - parse_time(c.started_at)
            inst.streak = 0 if ran >= STEADY_AFTER else inst.streak
        if not should_restart(self.spec.restart, reason):
            inst.state = State.EXITED if reason == CLEAN_EXIT else State.FAILED
            inst.reason = reason
            return False
        if index == 0:
            await self.remove_all(list(by_name.values()), Reason.killed(Kill.RESTARTED),
                                  skip=c.id)
        else:
            await self._remove(c.id)
        self._schedule_restart(reason)
        return True

    def _back_off(self) -> float:
        """Count a restart and set when the next start may happen; the delay."""
        inst = self.inst
        inst.restarts += 1
        inst.streak += 1
        delay = restart_backoff(inst.streak)
        inst.next_start = now() + delay
        return delay

    def _schedule_restart(self, reason: str) -> None:
        delay = self._back_off()
        inst = self.inst
        inst.state, inst.reason = State.STARTING, f"{reason}; restart {inst.restarts} in {delay:g}s"
        self.report(f"restarting in {delay:g}s (restart {inst.restarts})", True)

    async def _failed(self, reason: Reason) -> None:
        """A start failed: remove what was made, then retry after the backoff."""
        await self.remove_all(self.watch.of(self.inst.key), reason)
        self._back_off()
        self.inst.state, self.inst.reason = State.FAILED_TO_START, reason
        self.report(reason, True)

    def _reset(self, state: State, reason: str) -> None:
        self.inst.state, self.inst.reason = state, reason
        self.inst.containers = []
        self.inst.next_start = 0.0
        self.inst.streak = 0
        self.report(reason, False)

    async def _remove(self, container_id: str) -> None:
        await self.engine.remove(container_id)
        self.watch.drop(container_id)

    async def remove_all(self, found: list[ContainerState], reason: str, skip: str = "") -> None:
        """Stop in reverse spec order, then remove; a running container's end is recorded
        with `reason` (a container already ended keeps the reason it ended with)."""
        order = {s.name: i for i, s in enumerate(self.spec.containers)}
        for c in sorted(found, key=lambda c: -order.get(c.labels.get(LABEL_CONTAINER, ""), -1)):
            if c.running and c.id != skip:
                await self.engine.stop(c.id)
                self.inst.terminated(c.labels.get(LABEL_CONTAINER, ""), reason, c.id)
                self.report(f"stopped container {c.labels.get(LABEL_CONTAINER)}: {reason}",
                            False)
            await self._remove(c.id)

    async def _create(self, spec: ContainerSpec, network_of: str) -> ContainerState | None:
        inst = self.inst
        try:
            await self.engine.ensure_image(spec.image, lambda m: self.report(m, False))
        except EngineError as exc:
            await self._failed(Reason.failed_to_start(exc.message))
            return None
        config = container_config(inst, self.spec, spec, self.node.address, network_of,
                                  self.node.config_dir, self.configs.env)
        name = container_name(inst, spec.name)
        try:
            cid = await self.engine.create(name, config)
        except EngineError as exc:
            if exc.engine_status == 404:  # the image went away since: pull it next step
                raise
            if exc.engine_status != 409:
                await self._failed(Reason.failed_to_start(exc.message))
                return None
            # The name is taken: by a leftover copy of this instance (an older generation, a
            # crash between create and the record write), which is replaced (by its id: the
            # name may change hands meanwhile), or by anything else, which is left alone.
            taken = await self.engine.inspect(name)
            if taken is not None and not _same_instance(taken, inst.key, self.engine.cluster):
                await self._failed(Reason.failed_to_start(
                    f"container name {name} is taken by a container that is not a copy of "
                    f"{inst.key} in this cluster: remove or rename it"))
                return None
            if taken is not None:
                await self._remove(taken.id)
            cid = await self.engine.create(name, config)
        inst.next_start = 0.0
        labels = {**config["Labels"], **({LABEL_CLUSTER: self.engine.cluster}
                                        if self.engine.cluster else {})}
        c = ContainerState(id=cid, name=name, labels=labels, running=False, status="created",
                           exit_code=0, oom_killed=False, error="", started_at="",
                           finished_at="", pid=0, ip=inst.ip if not network_of else "")
        self.watch.put(c)
        return c


def _caps_text(limit: Resources) -> str:
    cpu = format_cpu(limit.cpu_m) if limit.cpu_m else "none"
    return f"cpu {cpu}, memory {format_size(limit.memory) if limit.memory else 'none'}"
