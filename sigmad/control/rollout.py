"""Rolling releases (issue 12): the decisions, as pure functions returning plans.

Records (etcd, DESIGN.md §2 layout):
- `revisions/{ns}/{app}/{n}` — `Revision`: revision n of the app is its template generation n:
  the spec an instance runs and `configs: {name: version}` (the config versions it pins;
  empty until config center, issue 13, lands). The app keeps its last KEEP_REVISIONS.
  A restart (`sigmactl rollout restart`) is a revision like any other whose spec and configs
  are those of the revision before (`restart` set): it rolls every instance anew.
- `rollouts/{ns}/{app}` — `Rollout`: from, to, state, the instances done, the reason. It is
  the only memory of a release: a new leader reads it and `plan` carries on where it was.

Contract shared with config rollouts (issue 13): there is ONE rollout machinery. A new config
version makes a new revision whose spec equals the old one and whose `configs` differ; the
per-instance step is chosen by `step_kind(old, new, app)`:
- "reload": only config versions differ — the executor sets `Instance.configs` to the new
  revision's pins and waits until the instance is ready again (same containers, same node);
- "move": anything else differs — the live-move path of drain (control/moves.py: the new copy
  starts beside the old with the same IP, becomes ready, the record flips, the old stops);
- "recreate": the app has SSD volumes or host ports (a second copy cannot hold them), so the
  instance stops and starts again in place; the rollout record says so (`recreate_reason`).

Execution (sigmad.control.controller `_sync_rollout`, on every sync of the app): the
controller builds an `InstanceView` of each instance (`view`), asks `plan`, writes the new
record first (with, on a revert, the app record the plan carries: the app rewritten to the
previous revision by `app_at`), then the instance steps `steps` returns (each guarded by the
instance as read).
An instance's step lives in its own record: `release` (the revision it is moving to),
`release_at` (when the step began) and `release_failed` (why it failed), so a new leader
rebuilds everything from etcd. A "move" step asks for a live move (`move`, booked by the
scheduler, executed by control/moves.py against the target revision); a "recreate" step lets
the Runner replace the containers in place. Until its step, an instance keeps running the
spec of its own revision (`Instance.generation`), never the app's newer one.

Invariants of `plan`:
- never more than `max_parallel` instances (of the batch size `batch_size` gives) are in
  transition at once; with `canary: N` only N move until `promote` (or `auto_promote`);
- an instance whose step failed (not ready within `progress_deadline`, crash-looping) fails
  the rollout: with `auto_revert` the plan becomes a rollout back to `from` (the same way,
  batch by batch) and carries the app record of `from` to write with it (`Plan.revert`,
  `Plan.app`); if `from` is no longer kept, or without `auto_revert`, the rollout pauses with
  the reason;
- the plan only reads its arguments; the controller executes it and writes through
  state/writes.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum

from sigmad.control.drive import parse_time
from sigmad.models import AppRecord, Instance
from sigmad.reasons import State
from sigmad.spec import AppSpec, Resources, UpdateSpec

KEEP_REVISIONS = 20


class Phase(StrEnum):
    """A rollout's state."""

    RUNNING = "running"  # moving instances batch by batch
    CANARY = "canary"  # the canaries are done; waits for `promote`
    PAUSED = "paused"  # by `pause`, or a failure without auto_revert (see `reason`)
    REVERTING = "reverting"  # a failure with auto_revert: rolling back to `from_revision`
    DONE = "done"  # every instance runs `to_revision`
    REVERTED = "reverted"  # every instance is back on `from_revision`


@dataclass(slots=True)
class Revision:
    """Revision n of an app: what an instance of it runs."""

    n: int
    spec: AppSpec
    configs: dict[str, int] = field(default_factory=dict)  # config name → version pinned
    created: float = 0.0
    restart: bool = False  # made by `rollout restart`: the spec and configs of the one before


@dataclass(slots=True)
class Rollout:
    """The one release in progress (or last finished) of an app."""

    from_revision: int
    to_revision: int
    phase: Phase = Phase.RUNNING
    done: list[int] = field(default_factory=list)  # instance indexes on `to_revision`, ready
    reason: str = ""
    recreate_reason: str = ""  # why instances stop then start instead of moving live
    promoted: bool = False
    started: float = 0.0
    updated: float = 0.0
    resume: str = ""  # the phase `resume` goes back to (set by `pause`)


@dataclass(slots=True)
class InstanceView:
    """What `plan` needs to know of one instance."""

    index: int
    revision: int  # the revision its containers run
    ready: bool  # every container ready, for at least min_ready
    in_transition: bool  # a step is under way (a move booked, a recreate, a reload)
    since: float = 0.0  # when its step began (for the progress deadline)
    failing: str = ""  # why its step failed ("" = not failing)
    booked: bool = False  # its node already holds the target revision's request: it goes first


@dataclass(slots=True)
class Plan:
    """What the controller does next: write `rollout` (and `app`, on a revert), then start
    steps on `start` (by `kind`)."""

    rollout: Rollout
    start: list[int] = field(default_factory=list)
    kind: str = "move"
    revert: int = 0  # the revision the app is rewritten to (0 = no revert begins)
    app: AppRecord | None = None  # that app record, written with `rollout`


def begun(old: AppRecord, new: AppRecord, now: float) -> Rollout:
    """The rollout record of a template change: from the app's previous template (what a
    revert goes back to) to its new one."""
    return Rollout(old.template_generation, new.template_generation,
                   recreate_reason=recreate_reason(new.spec), started=now, updated=now)


def batch_size(policy: UpdateSpec, replicas: int) -> int:
    """How many instances may be in transition at once (at least 1)."""
    if policy.percent:
        return max(1, math.floor(replicas * policy.max_parallel / 100))
    return max(1, policy.max_parallel)


def recreate_reason(spec: AppSpec) -> str:
    """Why instances of `spec` cannot move live ("" = they can)."""
    if spec.volumes:
        return "the app has SSD volumes: each instance stops, then starts on the new revision"
    if spec.network.ports:
        return "the app has host ports: each instance stops, then starts on the new revision"
    return ""


def step_kind(old: Revision, new: Revision, app: AppSpec) -> str:
    """"reload" when only the config versions differ, else "recreate" for an app that
    cannot run two copies of an instance (SSDs, host ports), else "move"."""
    if old.spec == new.spec and old.configs != new.configs:
        return "reload"
    return "recreate" if recreate_reason(app) else "move"


def app_at(rev: Revision, app: AppRecord, generation: int, updated: float) -> AppRecord:
    """`app` as it runs revision `rev`: the revision's spec and config versions, with the
    app's replicas and update policy now (a revision never scales the app nor changes how
    it rolls out)."""
    return AppRecord(dataclasses.replace(rev.spec, replicas=app.spec.replicas,
                                         update=app.spec.update),
                     generation, rev.n, app.created, updated, dict(rev.configs))


def plan(rollout: Rollout, instances: list[InstanceView], app: AppRecord,
         back: Revision | None, now: float) -> Plan:
    """The next step of `rollout` of `app` given its instances; `back` is revision
    `rollout.from_revision` if it is still kept (pure: reads only its arguments)."""
    policy = app.spec.update
    new = _copy(rollout)
    target = rollout.from_revision if rollout.phase == Phase.REVERTING else rollout.to_revision
    if rollout.phase in (Phase.DONE, Phase.REVERTED, Phase.PAUSED, Phase.CANARY):
        return Plan(new)
    failed = [i for i in instances if i.failing or (
        i.in_transition and i.since and now - i.since > policy.progress_deadline)]
    if failed:
        f = failed[0]
        why = f.failing or f"not ready within {policy.progress_deadline:g}s"
        new.done = []
        if rollout.phase == Phase.REVERTING:
            new.phase, new.reason = Phase.PAUSED, \
                f"the revert failed: instance {f.index} on revision {target}: {why}; " \
                f"({rollout.reason})"
            return Plan(new)
        new.reason = f"instance {f.index} on revision {target}: {why}"
        if not policy.auto_revert:
            new.phase = Phase.PAUSED
            return Plan(new)
        if back is None:
            new.phase = Phase.PAUSED
            new.reason += f"; revision {rollout.from_revision} is no longer kept: cannot revert"
            return Plan(new)
        new.phase = Phase.REVERTING  # the app is rewritten first: its steps come next pass
        return Plan(new, revert=back.n,
                    app=app_at(back, app, app.generation + 1, now))
    new.done = sorted(i.index for i in instances if i.revision == target and i.ready
                      and not i.in_transition)
    if len(new.done) == len(instances):
        new.phase = Phase.REVERTED if new.phase == Phase.REVERTING else Phase.DONE
        return Plan(new)
    busy = sum(1 for i in instances if i.in_transition)
    room = batch_size(policy, len(instances)) - busy
    if new.phase == Phase.RUNNING and policy.canary and not rollout.promoted:
        on_new = sum(1 for i in instances if i.revision == target or i.in_transition)
        if on_new >= policy.canary:
            if len(new.done) >= policy.canary and not policy.auto_promote:
                new.phase = Phase.CANARY
                return Plan(new)
            new.promoted = new.promoted or len(new.done) >= policy.canary
            room = 0 if not new.promoted else room
        else:
            room = min(room, policy.canary - on_new)
    todo = [i.index for i in sorted(instances, key=lambda i: (not i.booked, i.index))
            if i.revision != target and not i.in_transition]
    return Plan(new, todo[:max(room, 0)])


def target_of(rollout: Rollout) -> int:
    """The revision instances are being moved to."""
    return rollout.from_revision if rollout.phase in (Phase.REVERTING, Phase.REVERTED) \
        else rollout.to_revision


def ready_for(inst: Instance, now: float) -> float:
    """Seconds every container of `inst` has been running and ready (-1: not all are)."""
    if inst.state != State.RUNNING or not inst.containers or \
            not all(c.ready and c.state == "running" for c in inst.containers):
        return -1.0
    return now - max(parse_time(c.started_at) for c in inst.containers)


def failure(inst: Instance, target: int) -> str:
    """Why `inst`'s step to `target` failed ("" = it did not, or no such step)."""
    if inst.release != target:
        return ""
    if inst.release_failed:
        return inst.release_failed
    if inst.generation != target or inst.next_node:
        return ""
    if inst.state in (State.FAILED, State.FAILED_TO_START):
        return f"{inst.state}: {inst.reason}"
    ended = [t for t in inst.terminations if t.at > inst.release_at
             and not t.reason.startswith("KilledBySigma")]
    return f"container {ended[-1].container} ended: {ended[-1].reason}" if ended else ""


def view(inst: Instance, target: int, now: float, request: Resources | None = None
         ) -> InstanceView:
    """What `plan` sees of `inst` while the app rolls out to `target` (whose instances
    request `request`)."""
    stepping = inst.release == target and not inst.release_failed
    return InstanceView(
        index=inst.index, revision=inst.generation, ready=ready_for(inst, now) >= 0,
        in_transition=stepping or bool(inst.move or inst.next_node),
        since=inst.release_at if stepping else 0.0, failing=failure(inst, target),
        booked=request is not None and inst.request == request)


@dataclass(slots=True)
class Step:
    """A write to one instance: its new record, an event, host ports to release."""

    index: int
    new: Instance
    event: str
    warning: bool = False
    releases: list[tuple[str, dict[str, int]]] = field(default_factory=list)


def steps(rollout: Rollout, instances: list[Instance], p: Plan, min_ready: float,
          now: float) -> list[Step]:
    """The instance writes that carry out `p` (pure): steps begun, settled, or called off.

    - a step toward another revision than the target (the rollout reverted, or a newer
      release began) is called off: a booked live move is cancelled (its new copy becomes a
      stray and is removed);
    - a failed step is cleared once the rollout has recorded the failure (so `resume`
      retries that instance);
    - a step on the target whose instance has been ready `min_ready` seconds is done;
    - each instance `p.start` names begins a step (`p.kind`)."""
    target = target_of(p.rollout)
    out = []
    for inst in instances:
        if not inst.release:
            continue
        if inst.release != target or (inst.release_failed and p.rollout.phase != Phase.RUNNING):
            new, releases = _cleared(inst), []
            if inst.next_node and inst.release != target:
                new = _cleared(inst.move_cancelled(
                    f"release to revision {inst.release} called off"))
                releases = [(inst.next_node, dict(inst.next_ports))]
            why = inst.release_failed or f"now rolling to revision {target}"
            out.append(Step(inst.index, new, f"release step to revision {inst.release} "
                            f"ended: {why}", bool(inst.release_failed), releases))
        elif not inst.release_failed and inst.generation == target and not inst.next_node \
                and not failure(inst, target) and ready_for(inst, now) >= min_ready:
            out.append(Step(inst.index, _cleared(inst), f"on revision {target}, ready "
                            f"{min_ready:g}s"))
    by_index = {i.index: i for i in instances}
    for index in p.start:
        inst = by_index[index]
        new = inst.move_asked(f"release to revision {target}") if p.kind == "move" \
            else inst.copy()
        new.release, new.release_at, new.release_failed = target, now, ""
        how = "moves live to another node" if p.kind == "move" else \
            f"stops, then starts again ({p.rollout.recreate_reason})"
        out.append(Step(index, new, f"release to revision {target}: {how}"))
    return out


def _cleared(inst: Instance) -> Instance:
    new = inst.copy()
    new.release, new.release_at, new.release_failed = 0, 0.0, ""
    return new


def prune(revisions: list[int], current: int) -> list[int]:
    """The revisions to delete: all but the last KEEP_REVISIONS (never `current`)."""
    keep = set(sorted(revisions)[-KEEP_REVISIONS:]) | {current}
    return [n for n in revisions if n not in keep]


def _copy(r: Rollout) -> Rollout:
    """A copy `plan` may change."""
    return Rollout(r.from_revision, r.to_revision, r.phase, list(r.done), r.reason,
                   r.recreate_reason, r.promoted, r.started, r.updated, r.resume)
