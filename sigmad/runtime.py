"""One instance's containers on its node's engine: ordered start, readiness, restarts and the
one authoritative reason for every container end (DESIGN.md §3).

`Runner.step` never blocks on the instance: it does what can be done now (create, start, one
readiness probe) and leaves the rest to the next step, so one slow instance holds up nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sigmad.engine import (
    LABEL_CLUSTER,
    LABEL_CONTAINER,
    LABEL_INSTANCE,
    ContainerState,
    Engine,
    container_config,
    container_name,
)
from sigmad.errors import EngineError
from sigmad.models import (
    EXITED,
    FAILED,
    FAILED_TO_START,
    RUNNING,
    SCHEDULED,
    STARTING,
    AppRecord,
    ContainerStatus,
    Instance,
    now,
)
from sigmad.spec import ContainerSpec, ReadyCheck

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0
STEADY_AFTER = 60.0  # a container that ran this long before ending resets the failure streak
PROBE_TIMEOUT = 5.0


def restart_backoff(streak: int) -> float:
    """Seconds to wait before restarting after `streak` quick failures in a row: 1, 2, 4 …
    capped at a minute."""
    return float(min(2 ** max(streak - 1, 0), MAX_BACKOFF))


def should_restart(policy: str, reason: str) -> bool:
    """Whether the restart policy restarts a container that ended for `reason`."""
    if policy == "always":
        return True
    return policy == "on-failure" and reason != "Exited(0)"


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


def _ours(c: ContainerState, instance: str, cluster: str) -> bool:
    """Whether a container is this cluster's: it carries our cluster label, or (made before
    containers carried one) no cluster label but this instance's label."""
    if LABEL_CLUSTER in c.labels:
        return c.labels[LABEL_CLUSTER] == cluster
    return c.labels.get(LABEL_INSTANCE) == instance


def _status(name: str, c: ContainerState, ready: bool) -> ContainerStatus:
    return ContainerStatus(
        name=name, id=c.id, state=c.status,
        exit_code=None if c.running else c.exit_code,
        started_at=c.started_at, finished_at="" if c.running else c.finished_at,
        ready=ready,
    )


class Runner:
    """Brings one instance's containers on one engine in line with its app, in spec order."""

    Report = Callable[[str, bool], None]  # (message, warning)

    def __init__(
        self, engine: Engine, inst: Instance, app: AppRecord, host_ip: str, report: Report,
    ) -> None:
        self.engine = engine
        self.inst = inst
        self.app = app
        self.spec = app.spec
        self.host_ip = host_ip
        self.report = report

    async def step(self, hold: str = "") -> None:
        """One step. `hold` (e.g. unmet depends_on) keeps an instance that has no containers
        yet from starting."""
        inst = self.inst
        found = await self.engine.find({LABEL_INSTANCE: inst.key})
        owner = next((c for c in found
                      if c.labels.get(LABEL_CONTAINER) == self.spec.containers[0].name), None)
        if owner is not None and owner.running and owner.ip != inst.ip:
            # Made for another IP (the fixed IP changed, or before the overlay existed).
            await self.remove_all(found, "KilledBySigma(updated)")
            self._reset(SCHEDULED, f"replacing containers: the instance's IP is {inst.ip}")
            found = []
        if inst.generation != self.app.template_generation and inst.request == \
                self.spec.request():  # the controller booked the new request on this node
            await self.remove_all(found, "KilledBySigma(updated)")
            self._reset(SCHEDULED, f"replacing containers for generation "
                        f"{self.app.template_generation}")
            inst.generation = self.app.template_generation
            found = []
        wanted = {s.name for s in self.spec.containers}
        for stale in [c for c in found if c.labels.get(LABEL_CONTAINER) not in wanted]:
            await self.engine.remove(stale.id)
        by_name = {c.labels.get(LABEL_CONTAINER, ""): c for c in found}
        if not by_name and (hold or not inst.ip):
            inst.state, inst.reason = SCHEDULED, hold or "waiting for an overlay IP"
            return
        await self._walk(by_name)

    async def _walk(self, by_name: dict[str, ContainerState]) -> None:
        inst = self.inst
        was_ready = {c.id: c.ready for c in inst.containers}
        statuses: list[ContainerStatus] = []
        first_id = ""
        for index, spec in enumerate(self.spec.containers):
            c = by_name.get(spec.name)
            if c is not None and not c.running and c.status != "created":
                if not await self._ended(index, c, by_name):
                    statuses.append(_status(spec.name, c, False))
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
                c = await self.engine.inspect(c.id) or c
                self.report(f"started container {spec.name} ({c.id[:12]})", False)
            first_id = first_id or c.id
            if not c.running:
                statuses.append(_status(spec.name, c, False))
                break
            ready = was_ready.get(c.id, False) or await self._probe(spec, c)
            statuses.append(_status(spec.name, c, ready))
            if not ready:
                if inst.state != FAILED_TO_START:
                    inst.state, inst.reason = STARTING, f"waiting for {spec.name} to be ready"
                break
        inst.containers = statuses
        if len(statuses) == len(self.spec.containers) and all(s.ready for s in statuses):
            if inst.state != RUNNING:
                self.report("all containers ready: Running", False)
            inst.state, inst.reason = RUNNING, ""
        elif inst.state not in (EXITED, FAILED, FAILED_TO_START):
            inst.state = STARTING

    async def _probe(self, spec: ContainerSpec, c: ContainerState) -> bool:
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
        started = parse_time(c.started_at)
        if started and now() - started > spec.ready.timeout:
            reason = f"FailedToStart(container {spec.name} not ready after " \
                     f"{spec.ready.timeout:g}s{why})"
            await self._failed(reason)
        return False

    async def _ended(self, index: int, c: ContainerState,
                     by_name: dict[str, ContainerState]) -> bool:
        """Record a container end; True if the container (or, for the network owner, every
        container) was removed to be restarted."""
        inst = self.inst
        name = c.labels.get(LABEL_CONTAINER, "")
        reason = c.end_reason()
        if not any(t.container_id == c.id for t in inst.terminations):
            inst.terminated(name, reason, c.id)
            self.report(f"container {name} ended: {reason}", reason != "Exited(0)")
            ran = parse_time(c.finished_at) - parse_time(c.started_at)
            inst.streak = 0 if ran >= STEADY_AFTER else inst.streak
        if not should_restart(self.spec.restart, reason):
            inst.state = EXITED if reason == "Exited(0)" else FAILED
            inst.reason = reason
            return False
        if index == 0:
            await self.remove_all(list(by_name.values()), "KilledBySigma(restarted)", skip=c.id)
        else:
            await self.engine.remove(c.id)
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
        inst.state, inst.reason = STARTING, f"{reason}; restart {inst.restarts} in {delay:g}s"
        self.report(f"restarting in {delay:g}s (restart {inst.restarts})", True)

    async def _failed(self, reason: str) -> None:
        """A start failed: remove what was made, then retry after the backoff."""
        await self.remove_all(await self.engine.find({LABEL_INSTANCE: self.inst.key}),
                              reason)
        self._back_off()
        self.inst.state, self.inst.reason = FAILED_TO_START, reason
        self.report(reason, True)

    def _reset(self, state: str, reason: str) -> None:
        self.inst.state, self.inst.reason = state, reason
        self.inst.containers = []
        self.inst.next_start = 0.0
        self.inst.streak = 0
        self.report(reason, False)

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
            await self.engine.remove(c.id)

    async def _create(self, spec: ContainerSpec, network_of: str) -> ContainerState | None:
        inst = self.inst
        try:
            await self.engine.ensure_image(spec.image, lambda m: self.report(m, False))
        except EngineError as exc:
            await self._failed(f"FailedToStart({exc.message})")
            return None
        config = container_config(inst, self.spec, spec, self.host_ip, network_of)
        name = container_name(inst, spec.name)
        try:
            cid = await self.engine.create(name, config)
        except EngineError as exc:
            if exc.engine_status != 409:
                await self._failed(f"FailedToStart({exc.message})")
                return None
            # The name is taken: by a leftover of ours (an older generation, a crash between
            # create and the record write), which is replaced, or by a container that is not
            # this cluster's, which is left alone.
            taken = await self.engine.inspect(name)
            if taken is not None and not _ours(taken, inst.key, self.engine.cluster):
                await self._failed(f"FailedToStart(container name {name} is taken by a "
                                   "container this cluster does not own)")
                return None
            await self.engine.remove(name)
            cid = await self.engine.create(name, config)
        inst.next_start = 0.0
        return await self.engine.inspect(cid)
