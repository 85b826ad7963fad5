"""A mounted config's new version on a live app (issue 13): the pure decisions of its
rollout. sigmad.control.reconcile folds the plan into the app's sync; the controller writes
it; sigmad.control.drive (the Runner) runs `on_change` and re-probes.

Records: `AppRecord.configs` (the versions the app's instances pin); `Instance.configs`
(pinned), `configs_have` (what its containers run with), `reloaded_at` (when `on_change`
ran for those; 0 once its readiness passed again).

Invariants:
- at most `update.max_parallel` placed instances on the app's versions are busy at once (not
  Running, their containers not yet on those versions, or their reload not yet checked); an
  instance that serves nothing (unplaced, or not Running) takes the versions at once;
- a reload is checked before its place is free: with a readiness probe, the Runner probes
  again after the signal (the instance is Starting until one passes); without one, the
  instance stays Running with no container ending for `update.min_ready` seconds after it;
- every function reads only its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sigmad.control import rollout
from sigmad.models import AppRecord, Instance
from sigmad.reasons import State
from sigmad.spec import AppSpec


@dataclass(slots=True)
class ReloadPlan:
    """What the app's config rollout does next."""

    pins: set[str] = field(default_factory=set)  # instances to pin to the app's versions
    checked: dict[str, str] = field(default_factory=dict)  # instance → event: check passed
    watching: bool = False  # a check is under way: look again (min_ready, the deadline)


def plan(app: AppRecord | None, instances: Iterable[Instance], now: float) -> ReloadPlan:
    """The next step of `app`'s config rollout (None: the app was deleted)."""
    out = ReloadPlan()
    if app is None:
        return out
    live = sorted((i for i in instances
                   if i.state != State.TERMINATING and i.index < app.spec.replicas),
                  key=lambda i: i.index)
    policy = app.spec.update
    for inst in live:
        if not checking(inst):
            continue
        if check_passed(inst, app.spec, now, policy.min_ready):
            out.checked[inst.key] = "ready again after taking configs " + \
                pins_text(inst.configs_have)
            continue
        out.watching = True
    behind = [i for i in live if i.configs != app.configs]
    out.pins = {i.key for i in behind if not serving(i)}
    busy = sum(1 for i in live if i.configs == app.configs and i.node and not settled(i)
               and i.key not in out.checked)
    room = rollout.batch_size(policy, app.spec.replicas) - busy
    out.pins |= {i.key for i in [i for i in behind if serving(i)][:max(0, room)]}
    return out


def serving(inst: Instance) -> bool:
    """Placed and Running: a reload may take it out of service."""
    return bool(inst.node) and inst.state == State.RUNNING


def checking(inst: Instance) -> bool:
    """It took its pinned versions by a reload whose readiness is not yet checked."""
    return bool(inst.reloaded_at) and inst.configs_have == inst.configs


def settled(inst: Instance) -> bool:
    """Running with containers on the versions it is pinned to, its reload checked."""
    return inst.state == State.RUNNING and inst.configs_have == inst.configs and \
        not inst.reloaded_at


def probed(spec: AppSpec) -> bool:
    """Whether the app's containers have a readiness probe (re-run after a reload)."""
    return any(c.ready is not None for c in spec.containers)


def check_passed(inst: Instance, spec: AppSpec, now: float, min_ready: float) -> bool:
    """Its reload is checked: Running (with a probe, the Runner probed again after the
    reload), no container ended since, and, without a probe, `min_ready` seconds on."""
    if inst.state != State.RUNNING or ended_since(inst) or not inst.containers or \
            not all(c.ready and c.state == "running" for c in inst.containers):
        return False
    return probed(spec) or now - inst.reloaded_at >= min_ready


def ended_since(inst: Instance) -> str:
    """The last container end since its reload that sigma did not ask for ("" = none)."""
    ended = [t for t in inst.terminations if t.at > inst.reloaded_at
             and not t.reason.startswith("KilledBySigma")]
    return f"container {ended[-1].container} ended: {ended[-1].reason}" if ended else ""


def pins_text(pins: Mapping[str, int]) -> str:
    """`name vN, …` of a version map."""
    return ", ".join(f"{n} v{v}" for n, v in sorted(pins.items())) or "none"
