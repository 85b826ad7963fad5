"""Pure decisions of the controller about apps: which instances to create, retire or give
another overlay IP, and what an app waits for (depends_on). Each returns changes built by
sigmad.state.writes and the events to tell; the controller writes them.

Invariants:
- an instance `APP-INDEX` exists for every index below `replicas`, created with its overlay
  IP claimed in the same transaction (so it is never placed without one);
- an instance past `replicas`, or of a deleted app, becomes Terminating (its containers
  stop, then the record and its claims go);
- an instance is pinned to the config versions its app resolves (`AppRecord.configs`): a
  new one from its creation, a live one by a rewrite of its record (its node's agent then
  delivers them, and sigmad.control.drive runs `on_change`), in the batches, with the
  readiness re-check and the revert that sigmad.control.reloads decides;
- IP choices see every claim (`taken`), and add what they claim to it, so one pass never
  hands one address twice; the create-if-absent guard catches any other writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sigmad.control import reloads
from sigmad.control.reloads import pins_text
from sigmad.models import AppRecord, Instance, new_instance
from sigmad.network import ipam
from sigmad.reasons import Kill, Reason, State
from sigmad.state.writes import Change, Writes
from sigmad.store import Versioned

WAITING_FOR_IP = "waiting for an overlay IP"


@dataclass
class AppPlan:
    changes: list[Change] = field(default_factory=list)
    events: list[tuple[Instance, str, bool]] = field(default_factory=list)  # message, warning
    app: AppRecord | None = None  # the app's new record: its config rollout failed (then
    # the plan has no other change: the next sync works from the new record)
    watching: bool = False  # a config reload is being checked: sync again in a while


def sync_app(writes: Writes, app: AppRecord | None, instances: Mapping[str, Versioned[Instance]],
             net: ipam.OverlayNet, taken: set[str], now: float) -> AppPlan:
    """The changes that bring an app's instances in line with its replicas, IPs and config
    versions (`app` None: the app was deleted)."""
    reload = reloads.plan(app, (v.value for v in instances.values()), now)
    plan = AppPlan(app=reload.app, watching=reload.watching)
    if reload.app is not None and reload.failed is not None:
        plan.events.append((reload.failed, reload.app.configs_halt, True))
        return plan
    have: set[int] = set()
    for v in instances.values():
        inst = v.value
        have.add(inst.index)
        if inst.state == State.TERMINATING:
            continue
        if app is None or inst.index >= app.spec.replicas:
            why = Reason.killed(Kill.DELETED if app is None else Kill.SCALED_DOWN)
            plan.changes.append(writes.update_instance(v, inst.terminating(why)))
            plan.events.append((inst, f"terminating: {why}", False))
            continue
        new, claim = ip_change(writes, inst, app, net, taken)
        if inst.key in reload.pins:
            new = new or inst.copy()
            new.configs = dict(app.configs)
            plan.events.append((inst, "config versions pinned: " + pins_text(app.configs),
                                False))
        elif inst.key in reload.checked:
            new = new or inst.copy()
            new.reloaded_at = 0.0
            plan.events.append((inst, reload.checked[inst.key], False))
        if new is not None:
            plan.changes.append(writes.update_instance(v, new) + claim)
    if app is None:
        return plan
    for index in range(app.spec.replicas):
        if index in have:
            continue
        inst = new_instance(app.spec, index, app.template_generation, app.configs)
        fresh, claim = ip_change(writes, inst, app, net, taken)
        inst = fresh or inst
        plan.changes.append(writes.create_instance(inst) + claim)
        if not inst.ip:  # (with one, "scheduled on NODE (IP …)" tells it next)
            plan.events.append((inst, f"created: {inst.reason}", True))
    return plan


def ip_change(writes: Writes, inst: Instance, app: AppRecord, net: ipam.OverlayNet,
              taken: set[str]) -> tuple[Instance | None, Change]:
    """The IP `inst` should hold: its fixed one (`network.ip`), the one it holds, or a free
    one. A new record and the claim (and the release of an IP it gives up) if that is not
    what it has; (None, no change) if it is. Without an address, the reason says why."""
    fixed = app.spec.network.fixed_ip(inst.index)
    if inst.ip and (fixed or inst.ip) == inst.ip and not net.usable(inst.ip):
        return None, Change()
    ip, why = ipam.choose(net, fixed, inst.ip, taken)
    if why:
        reason = f"{WAITING_FOR_IP}: {why}"
        if inst.reason == reason:
            return None, Change()
        new = inst.copy()
        new.reason = reason
        return new, Change()
    if ip == inst.ip and not inst.reason.startswith(WAITING_FOR_IP):
        return None, Change()
    new = inst.copy()
    if new.reason.startswith(WAITING_FOR_IP):
        new.reason = ""
    if ip == inst.ip:
        return new, Change()
    taken.add(ip)
    new.ip = ip
    claim = writes.claim_ip(new)
    if inst.ip and not net.usable(inst.ip):
        claim += writes.release_ip(inst.ip)
    return new, claim


def unmet_dependencies(app: AppRecord, apps: Mapping[str, AppRecord],
                       running: Mapping[str, int]) -> str:
    """Why `app` must wait for its depends_on apps ("" when all have every replica Running);
    `running`: Running instances per `ns/app`."""
    waiting = []
    for dep in app.spec.depends_on:
        key = f"{app.spec.namespace}/{dep}"
        rec = apps.get(key)
        if rec is None:
            waiting.append(f"{dep} (no such app)")
            continue
        n = running.get(key, 0)
        if n < rec.spec.replicas:
            waiting.append(f"{dep} ({n}/{rec.spec.replicas} running)")
    return f"waiting for depends_on: {', '.join(waiting)}" if waiting else ""
