"""The learner's side of the replicas: what it published (`Published`), which update a replica
holding some identity needs (`plan_update`), and what the replicas reported (`ReplicaReports`:
the highest version any holds, and the acknowledged events not yet on every live replica, for
the staleness figure). No Ray: the learner turns a plan into object refs."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from online_learning.protocol import ReplicaIdentity, ReplicaReport

__all__ = ["Published", "plan_update", "ReplicaReports", "REPLICA_LIVE_S", "REPLICA_FORGET_S"]

REPLICA_LIVE_S = 30.0  # a replica that reported within this is live (staleness, status)
REPLICA_FORGET_S = 300.0  # a replica silent this long is forgotten


@dataclass(frozen=True)
class Published:
    """What replicas are told to serve; replaced whole (never mutated), so readers need no lock."""

    lineage: str
    version: int
    digest: str
    log_offset: int
    chain_base: int  # the lineage's first version: a replica below it gets full weights
    published_at: float
    base: int  # the store version the lineage started from
    deltas: dict = field(default_factory=dict)  # version -> ObjectRef of the delta that made it

    def identity(self) -> ReplicaIdentity:
        return ReplicaIdentity(self.lineage, self.version, self.digest, self.log_offset)


def plan_update(identity: ReplicaIdentity, pub: Published | None) -> tuple[str, list[int]]:
    """What a replica holding `identity` (lineage, version, digest) needs from `pub`: ("wait", [])
    before any publish, ("none", []), ("relabel", []) when it holds the same weights under another
    name, ("deltas", versions) when every delta from its version on is kept on its lineage, else
    ("full", [])."""
    if pub is None:
        return "wait", []
    same_weights = identity.digest == pub.digest
    if same_weights and identity.lineage == pub.lineage and identity.version == pub.version:
        return "none", []
    if same_weights:
        return "relabel", []
    wanted = range(identity.version + 1, pub.version + 1)
    if (identity.lineage == pub.lineage and wanted.start > pub.chain_base and len(wanted)
            and all(v in pub.deltas for v in wanted)):
        return "deltas", list(wanted)
    return "full", []


class ReplicaReports:
    """What replicas reported holding, and the acknowledged events (offset, ack time) that some
    live replica does not serve yet, oldest first.

    Every interval here (a replica's liveness, an event's staleness) is measured within the
    learner's process, so `now` and the ack times are `time.monotonic()` by default: a step of the
    wall clock (NTP, a VM resumed) neither fails healthy replicas nor hides real staleness.
    `reported_at` stays wall-clock time, for people and other processes reading it."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.replicas: dict[str, ReplicaReport] = {}
        self.gone: dict[str, float] = {}  # replicas that said goodbye, when (a late poll must not revive them)
        self.max_reported = 0  # the highest version any replica reported holding
        self.acked: deque = deque()  # (offset, ack time on `clock`), in offset order

    def report(self, replica: str, identity: ReplicaIdentity, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if replica in self.gone:  # a poll that was in flight when it said goodbye
            return
        self.replicas[replica] = ReplicaReport.of(identity, reported_at=time.time(), seen=now)
        self.max_reported = max(self.max_reported, identity.version or 0)
        for name in [r for r, v in self.replicas.items() if now - v.seen > REPLICA_FORGET_S]:
            del self.replicas[name]

    def forget(self, replica: str, now: float | None = None) -> None:
        """A replica that said goodbye (Serve stopping it): its old offset no longer holds the
        staleness figure up for REPLICA_LIVE_S after it is gone. Serve never reuses a replica's
        id, so reports under it are ignored from now on (remembered REPLICA_FORGET_S)."""
        now = self.clock() if now is None else now
        self.replicas.pop(replica, None)
        self.gone[replica] = now
        for name in [r for r, at in self.gone.items() if now - at > REPLICA_FORGET_S]:
            del self.gone[name]

    def live(self, now: float | None = None) -> dict[str, ReplicaReport]:
        now = self.clock() if now is None else now
        return {r: v for r, v in self.replicas.items() if now - v.seen < REPLICA_LIVE_S}

    def acknowledged(self, offsets, now: float | None = None) -> None:
        """New events acknowledged now (offsets above every one recorded)."""
        now = self.clock() if now is None else now
        self.acked.extend((off, now) for off in offsets)

    def acknowledged_before(self, offsets: range, when: float | None = None) -> None:
        """Events acknowledged before those recorded (a learner's start: the log it found):
        one C call, so a concurrent `acknowledged` on the other end cannot interleave."""
        when = self.clock() if when is None else when
        self.acked.extendleft([(off, when) for off in reversed(offsets)])

    def prune(self, served_offset: int, now: float | None = None) -> None:
        """Forget the ack times of events every live replica serves (`served_offset`, the
        published version's, when none is live)."""
        lowest = min((v.log_offset for v in self.live(now).values()), default=served_offset)
        while self.acked and self.acked[0][0] <= lowest:
            self.acked.popleft()

    def oldest_unserved(self) -> float | None:
        return self.acked[0][1] if self.acked else None

    def staleness_s(self, now: float | None = None) -> float:
        """How long the oldest acknowledged event some live replica lacks has waited (0: none)."""
        oldest = self.oldest_unserved()
        return (self.clock() if now is None else now) - oldest if oldest is not None else 0.0
