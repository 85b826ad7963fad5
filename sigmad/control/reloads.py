"""A mounted config's new version on a live app (issue 13): the pure decisions of its
rollout. sigmad.control.reconcile folds the plan into the app's sync; the controller writes
it; sigmad.control.drive (the Runner) runs `on_change` and re-probes.

Records: `AppRecord.configs` (the versions the app's instances pin), `configs_from` (those
before its last change: what a revert goes back to), `configs_halt` (why the last config
rollout failed); `Instance.configs` (pinned), `configs_have` (what its containers run with),
`reloaded_at` (when `on_change` ran for those; 0 once its readiness passed again).

Invariants:
- at most `update.max_parallel` placed instances on the app's versions are busy at once (not
  Running, their containers not yet on those versions, or their reload not yet checked); an
  instance that serves nothing (unplaced, or not Running) takes the versions at once;
- a reload is checked before its place is free: with a readiness probe, the Runner probes
  again after the signal (the instance is Starting until one passes); without one, the
  instance stays Running with no container ending for `update.min_ready` seconds after it;
- an instance that took the new versions and fails its check (not ready again within
  `update.progress_deadline` of its reload, a container ended, Failed) fails the rollout:
  the app's record says why (`configs_halt`: the configs, the versions, the instance, the
  reason) and, with `update.auto_revert`, pins `configs_from` again, so the instances that
  took the new versions go back batch by batch the same way; without it no serving
  instance takes them any more until a new version or an apply rewrites the app;
- a halted rollout is not checked again (a revert has nothing further back to go to);
- every function reads only its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from sigmad.control import rollout
from sigmad.models import AppRecord, Instance
from sigmad.reasons import State
from sigmad.spec import AppSpec, UpdateSpec


@dataclass(slots=True)
class ReloadPlan:
    """What the app's config rollout does next."""

    pins: set[str] = field(default_factory=set)  # instances to pin to the app's versions
    checked: dict[str, str] = field(default_factory=dict)  # instance → event: check passed
    app: AppRecord | None = None  # the app's new record: its rollout failed (halt, revert)
    failed: Instance | None = None  # the instance whose check failed
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
        why = failure(inst, now, policy) if inst.configs == app.configs and \
            not app.configs_halt and changed(app) else ""
        if why and out.app is None:
            out.app, out.failed = halted(app, inst, why, now), inst
    if out.app is not None:
        return out
    behind = [i for i in live if i.configs != app.configs]
    out.pins = {i.key for i in behind if not serving(i)}
    if stopped(app):
        return out
    # (one checked now still counts: its record says so before the next one is pinned)
    busy = sum(1 for i in live if i.configs == app.configs and i.node and not settled(i))
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


def failure(inst: Instance, now: float, policy: UpdateSpec) -> str:
    """Why the reload of `inst` failed ("" = it has not, yet)."""
    if inst.state in (State.FAILED, State.FAILED_TO_START, State.EXITED):
        return f"{inst.state}: {inst.reason}"
    ended = ended_since(inst)
    if ended:
        return ended
    if now - inst.reloaded_at > policy.progress_deadline:
        why = f" ({inst.state}: {inst.reason})" if inst.reason else f" ({inst.state})"
        return f"not ready again within {policy.progress_deadline:g}s of its reload{why}"
    return ""


def changed(app: AppRecord) -> dict[str, tuple[int, int]]:
    """The mounted configs whose version differs from the one before: name → (from, to)."""
    mounted = {c.name for c in app.spec.configs}
    return {n: (app.configs_from.get(n, 0), v) for n, v in sorted(app.configs.items())
            if n in mounted and app.configs_from.get(n, 0) != v}


def stopped(app: AppRecord) -> bool:
    """The rollout failed and was not reverted: serving instances take nothing more."""
    return bool(app.configs_halt) and bool(changed(app))


def halted(app: AppRecord, inst: Instance, why: str, now: float) -> AppRecord:
    """The app's record once `inst` failed its reload: the reason, and (with auto_revert,
    when every changed config has a version before) the previous versions pinned again."""
    moved = changed(app)
    text = ", ".join(f"{n} v{a} → v{b}" if a else f"{n} v{b}" for n, (a, b) in moved.items())
    reason = f"configs {text} failed on instance {inst.name}: {why}"
    back = {n: a for n, (a, _) in moved.items()}
    if not app.spec.update.auto_revert:
        reason += "; the rollout stopped (update.auto_revert is off): write a fixed version " \
            "or 'sigmactl config rollback'"
    elif not all(back.values()):
        reason += "; the rollout stopped: no version before to revert to"
    else:
        return replace(app, generation=app.generation + 1, updated=now,
                       configs={**app.configs, **back},
                       configs_halt=f"{reason}; reverted to {pins_text(back)}")
    return replace(app, generation=app.generation + 1, updated=now, configs_halt=reason)


def status(app: AppRecord, instances: Iterable[Instance]) -> str:
    """The app's config rollout: done, rolling, stopped, reverting or reverted."""
    live = [i for i in instances if i.state != State.TERMINATING and i.index <
            app.spec.replicas]
    on = all(i.configs == app.configs and (settled(i) or not i.node) for i in live)
    if app.configs_halt:
        return "stopped" if stopped(app) else "reverted" if on else "reverting"
    return "done" if on else "rolling"


def carried(old: AppRecord, resolved: Mapping[str, int],
            pins: Iterable[Mapping[str, int]]) -> tuple[dict[str, int], str]:
    """`configs_from` and `configs_halt` of the app's next record, which pins `resolved`
    (`pins`: the versions its instances pin now). Unchanged versions keep both; new ones
    revert to `old`'s versions, or, if `old`'s own rollout is unfinished, to what that one
    would have reverted to; and clear the halt."""
    if dict(resolved) == old.configs:
        return dict(old.configs_from), old.configs_halt
    if old.configs_from and not all(p == old.configs for p in pins):
        return dict(old.configs_from), ""
    return dict(old.configs), ""


def pins_text(pins: Mapping[str, int]) -> str:
    """`name vN, …` of a version map."""
    return ", ".join(f"{n} v{v}" for n, v in sorted(pins.items())) or "none"
