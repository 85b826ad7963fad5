"""Rolling releases (issue 12): the decisions, as pure functions returning plans.

Records (etcd, DESIGN.md §2 layout):
- `revisions/{ns}/{app}/{n}` — `Revision`: revision n of the app is its template generation n:
  the spec an instance runs and `configs: {name: version}` (the config versions it pins;
  empty until config center, issue 13, lands). The app keeps its last KEEP_REVISIONS.
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

Status: these decisions, the `update:` block's parser, and the revisions (written by apply,
read by `sigmactl rollout history`) exist; the executor does not yet. No `rollouts/` record is
written and drive.py still replaces every instance of a new template generation at once, so
the spec parser refuses a non-default `update:` block rather than ignore it.

Invariants of `plan`:
- never more than `max_parallel` instances (of the batch size `batch_size` gives) are in
  transition at once; with `canary: N` only N move until `promote` (or `auto_promote`);
- an instance whose step failed (not ready within `progress_deadline`, crash-looping) fails
  the rollout: with `auto_revert` the plan becomes a rollout back to `from` (the same way,
  batch by batch); otherwise the rollout pauses with the reason;
- the plan only reads its arguments; the controller executes it and writes through
  state/writes.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from sigmad.spec import AppSpec, UpdateSpec

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


@dataclass(slots=True)
class InstanceView:
    """What `plan` needs to know of one instance."""

    index: int
    revision: int  # the revision its containers run
    ready: bool  # every container ready, for at least min_ready
    in_transition: bool  # a step is under way (a move booked, a recreate, a reload)
    since: float = 0.0  # when its step began (for the progress deadline)
    failing: str = ""  # why its step failed ("" = not failing)


@dataclass(slots=True)
class Plan:
    """What the controller does next: start steps on `start` (by `kind`), write `rollout`."""

    rollout: Rollout
    start: list[int] = field(default_factory=list)
    kind: str = "move"


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


def plan(rollout: Rollout, instances: list[InstanceView], policy: UpdateSpec,
         now: float) -> Plan:
    """The next step of `rollout` given its instances (pure: reads only its arguments)."""
    new = _copy(rollout)
    target = rollout.from_revision if rollout.phase == Phase.REVERTING else rollout.to_revision
    if rollout.phase in (Phase.DONE, Phase.REVERTED, Phase.PAUSED, Phase.CANARY):
        return Plan(new)
    failed = [i for i in instances if i.revision == target and (
        i.failing or (not i.ready and i.since and now - i.since > policy.progress_deadline))]
    if failed and rollout.phase == Phase.RUNNING:
        f = failed[0]
        why = f.failing or f"not ready within {policy.progress_deadline:g}s"
        new.reason = f"instance {f.index} on revision {target}: {why}"
        new.phase = Phase.REVERTING if policy.auto_revert else Phase.PAUSED
        new.done = []
        if new.phase == Phase.PAUSED:
            return Plan(new)
        target = rollout.from_revision
    new.done = sorted(i.index for i in instances if i.revision == target and i.ready
                      and not i.in_transition)
    if len(new.done) == len(instances):
        new.phase = Phase.REVERTED if new.phase == Phase.REVERTING else Phase.DONE
        return Plan(new)
    busy = sum(1 for i in instances if i.in_transition)
    room = batch_size(policy, len(instances)) - busy
    if new.phase == Phase.RUNNING and policy.canary and not rollout.promoted:
        on_new = sum(1 for i in instances if i.revision == target)
        if on_new >= policy.canary:
            if len(new.done) >= policy.canary and not policy.auto_promote:
                new.phase = Phase.CANARY
                return Plan(new)
            new.promoted = new.promoted or len(new.done) >= policy.canary
            room = 0 if not new.promoted else room
        else:
            room = min(room, policy.canary - on_new)
    todo = [i.index for i in sorted(instances, key=lambda i: i.index)
            if i.revision != target and not i.in_transition]
    return Plan(new, todo[:max(room, 0)])


def prune(revisions: list[int], current: int) -> list[int]:
    """The revisions to delete: all but the last KEEP_REVISIONS (never `current`)."""
    keep = set(sorted(revisions)[-KEEP_REVISIONS:]) | {current}
    return [n for n in revisions if n not in keep]


def _copy(r: Rollout) -> Rollout:
    return Rollout(r.from_revision, r.to_revision, r.phase, list(r.done), r.reason,
                   r.recreate_reason, r.promoted, r.started, r.updated)
