"""Leader election and fencing (DESIGN.md §6).

Every master holds one lease of `ttl` seconds and keeps it alive every ttl/3. Under it, it
writes `masters/{id}` (it runs) and campaigns for `leader`: create-if-absent of the key with
the lease attached. The winner runs the controller on a store fenced by the leader key as won,
so each controller write compares that key; the others watch the key and campaign as soon as
it is deleted (lease expiry or resignation). A leader whose lease is lost (etcd says it
expired, or no keepalive got through for a whole TTL), whose key changes, or whose fenced write
is refused stops leading at once (its controller is cancelled) and campaigns again. On the way
out it resigns: it revokes its lease, so a standby takes over without waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sigmad import records
from sigmad.store import EtcdStore, Guard, LeaseKeeper, Store, WatchCompacted

log = logging.getLogger(__name__)
Lead = Callable[[], Coroutine[Any, Any, None]]
Gate = Callable[[], Coroutine[Any, Any, "str | None"]]
RECHECK = 10.0  # a standby campaigns at least this often, whatever its watch says
RETRY = 1.0  # seconds before the next try after a failed election step
RESIGN_TIMEOUT = 2.0  # seconds a resignation may take on the way out
LEADER, STANDBY = "leader", "standby"


@dataclass(slots=True)
class LeaderRecord:
    """The value of the `leader` key."""

    id: str
    api: str
    since: float


@dataclass(slots=True)
class MasterRecord:
    """The value of `masters/{id}`: a master that runs (while its lease lives)."""

    id: str
    api: str
    started: float


def masters_view(leader: LeaderRecord | None, masters: list[MasterRecord]) -> dict[str, Any]:
    """The answer of GET /v1/masters: the leader record and every master seen (leader first),
    each with its role and since when it has had it."""
    items = {m.id: {"id": m.id, "api": m.api, "role": STANDBY, "since": m.started}
             for m in masters}
    if leader is not None:
        items[leader.id] = {"id": leader.id, "api": leader.api, "role": LEADER,
                            "since": leader.since}
    ordered = sorted(items.values(), key=lambda i: (i["role"] != LEADER, str(i["id"])))
    return {"leader": records.to_dict(leader), "items": ordered}


class Elector:
    """Campaigns for the leader key with `store` (never fenced) and runs `lead` while it holds
    it, with `fenced` (the controller's store) fenced by the key as won."""

    def __init__(self, store: Store, fenced: Store, master_id: str, api: str, ttl: int,
                 watcher: Store | None = None, keep_in_thread: bool = False,
                 gate: Gate | None = None) -> None:
        self.store = store
        self.gate = gate  # why this master may not lead now (None: it may), asked each time
        self.fenced = fenced
        self.keys = store.keys
        self.id = master_id
        self.api = api
        self.ttl = ttl
        self.started = time.time()
        self.lease = 0
        self.leading = False
        self._deposed = asyncio.Event()
        self._stale: list[int] = []  # leases lost while etcd was unreachable: revoke later
        self._said = ""
        self.watcher = watcher
        self.keep_in_thread = keep_in_thread  # renew the lease from a thread (LeaseKeeper)
        self.beat = time.monotonic()  # when this loop last turned (the keeper's check)
        fenced.fence = self._never()
        fenced.on_deposed = self._deposed.set

    def _never(self) -> Guard:
        """The fence of a master that does not lead: no write passes it."""
        return Guard(self.keys.leader(), -1)

    async def run(self, lead: Lead) -> None:
        """Campaign and lead until cancelled; then resign."""
        watcher = self.watcher
        if watcher is None:  # a store of its own for watches, with the election's timeouts
            assert isinstance(self.store, EtcdStore)
            watcher = EtcdStore(self.store.endpoints, self.keys.prefix, self.store.retry_for,
                                self.store.rpc_timeout, tls=self.store.tls)
        try:
            while True:
                await self._term(lead, watcher)
        finally:
            self.fenced.fence = self._never()
            await self._resign()
            if watcher is not self.watcher:
                await watcher.close()

    async def _term(self, lead: Lead, watcher: Store) -> None:
        """One lease: grant it, say this master runs, campaign and lead until it is lost."""
        self.lease, granted = await self._grant()
        hold = asyncio.create_task(self._hold(self.lease, granted))
        try:
            registered = False
            while not hold.done():
                try:
                    if not registered:
                        await self.store.put(
                            self.keys.master(self.id),
                            MasterRecord(self.id, self.api, self.started), lease=self.lease,
                        )
                        registered = True
                    await self._campaign(lead, watcher, hold)
                except Exception as exc:  # etcd trouble: the lease decides what happens
                    log.warning("election: %s; trying again", _text(exc))
                    await asyncio.wait([hold], timeout=RETRY)
        finally:
            hold.cancel()
            await asyncio.gather(hold, return_exceptions=True)
        log.warning("%s lost its lease: %s", self.id, hold.result())
        self._stale.append(self.lease)  # it may still live in etcd: revoke it when we can
        self.lease = 0

    async def _grant(self) -> tuple[int, float]:
        """A new lease and when it was asked for, trying until etcd answers. Leases lost
        earlier are revoked first, so their keys (a stale leader key) go at once."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                while self._stale:
                    await self.store.revoke(self._stale[0])
                    self._stale.pop(0)
                asked = loop.time()
                return await self.store.grant(self.ttl), asked
            except Exception as exc:
                self._say(f"etcd unreachable ({_text(exc)}); not leading, retrying")
                await asyncio.sleep(RETRY)

    async def _hold(self, lease: int, granted: float) -> str:
        """Keep `lease` alive every ttl/3; return why it is lost: etcd says it expired, or no
        keepalive got through for a whole TTL (it may have expired: assume so).

        With `keep_in_thread` the keepalives go from a LeaseKeeper thread, which a busy loop
        cannot starve (it renews only while this loop still turns); this task then checks
        what the thread achieved."""
        expires = granted + self.ttl
        keeper = None
        if self.keep_in_thread:
            assert isinstance(self.store, EtcdStore)
            keeper = LeaseKeeper(self.store.endpoints, lease, self.ttl,
                                 lambda: time.monotonic() - self.beat < self.ttl,
                                 tls=self.store.tls)
            keeper.start()
        try:
            return await self._hold_until_lost(lease, expires, keeper)
        finally:
            if keeper is not None:
                keeper.stop()

    async def _hold_until_lost(self, lease: int, expires: float,
                               keeper: LeaseKeeper | None) -> str:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, min(self.ttl / 3, expires - loop.time())))
            self.beat = time.monotonic()
            if keeper is not None:
                if keeper.expired:
                    return "etcd says it expired"
                expires = max(expires, keeper.last_ok + self.ttl)  # (loop time is monotonic)
                if loop.time() >= expires:
                    return f"no keepalive got through for {self.ttl}s ({keeper.error})"
                continue
            sent = loop.time()
            if sent >= expires:
                return f"no keepalive got through for {self.ttl}s"
            try:
                alive = await asyncio.wait_for(self.store.keepalive(lease), expires - sent)
            except TimeoutError:
                return f"no keepalive got through for {self.ttl}s"
            except Exception as exc:
                log.warning("lease keepalive failed: %s", _text(exc))
                continue
            if not alive:
                return "etcd says it expired"
            expires = sent + self.ttl

    async def _campaign(self, lead: Lead, watcher: Store, hold: asyncio.Task[str]) -> None:
        """Try once to take the leader key: lead while it is ours, else wait until it is
        free."""
        if self.gate is not None and (why := await self.gate()):
            self._say(f"{self.id} does not lead: {why}")
            await asyncio.wait([hold], timeout=RECHECK)
            return
        key = self.keys.leader()
        claim = await self.store.claim(key, LeaderRecord(self.id, self.api, time.time()),
                                       self.lease)
        if claim.mod_revision:
            await self._lead(Guard(key, claim.mod_revision), lead, watcher, hold)
        else:
            self._say(f"{self.id} is a standby")
            await self._vacant(claim.revision, watcher, hold)

    async def _lead(self, fence: Guard, lead: Lead, watcher: Store,
                    hold: asyncio.Task[str]) -> None:
        """Run `lead` with the fence set until leadership ends, then cancel it."""
        self._deposed.clear()
        self.fenced.fence = fence
        self.leading = True
        self._say(f"{self.id} is the leader (leader key at revision {fence.mod_revision})")
        work = asyncio.create_task(lead())
        changed = asyncio.create_task(self._until_changed(fence, watcher))
        deposed = asyncio.create_task(self._deposed.wait())
        try:
            done, _ = await asyncio.wait([hold, changed, deposed, work],
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.fenced.fence = self._never()
            self.leading = False
            for task in (work, changed, deposed):
                task.cancel()
            await asyncio.gather(work, changed, deposed, return_exceptions=True)
        why = ("the lease is lost" if hold in done else "a fenced write was refused"
               if deposed in done else "the leader key changed" if changed in done
               else "the controller stopped")
        log.warning("%s stops leading: %s", self.id, why)
        self._said = ""
        if work in done:
            if not work.cancelled() and work.exception() is not None:
                log.error("the controller crashed", exc_info=work.exception())
            await asyncio.sleep(RETRY)

    async def _until_changed(self, fence: Guard, watcher: Store) -> None:
        """Until the leader key changes after it was won (deleted or overwritten)."""
        events = watcher.watch_key(fence.key, fence.mod_revision + 1)
        async with contextlib.aclosing(events):
            async for _ in events:
                return

    async def _vacant(self, revision: int, watcher: Store, hold: asyncio.Task[str]) -> None:
        """Until the leader key is deleted after `revision`, the lease is lost, or RECHECK
        seconds pass."""

        async def deleted() -> None:
            events = watcher.watch_key(self.keys.leader(), revision + 1)
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.value is None:
                        return

        wait = asyncio.create_task(deleted())
        try:
            await asyncio.wait([wait, hold], timeout=RECHECK,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wait.cancel()
            result = await asyncio.gather(wait, return_exceptions=True)
        if isinstance(result[0], WatchCompacted):
            log.debug("leader watch compacted; campaigning again")

    async def _resign(self) -> None:
        """Revoke the lease: the leader key (if ours) and masters/{id} go with it."""
        lease, self.lease = self.lease, 0
        if not lease:
            return
        try:
            await asyncio.wait_for(self.store.revoke(lease), RESIGN_TIMEOUT)
            log.info("%s resigned (lease revoked)", self.id)
        except Exception as exc:
            log.warning("%s could not resign (%s): its lease expires within %ds", self.id,
                        _text(exc), self.ttl)

    def _say(self, message: str) -> None:
        """Log a state once, not on every recheck."""
        if message != self._said:
            log.info("%s", message)
            self._said = message


def _text(exc: BaseException) -> str:
    return str(getattr(exc, "message", "") or exc or type(exc).__name__)
