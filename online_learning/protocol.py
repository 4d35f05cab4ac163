"""What the replicas and the learner say to each other: one typed vocabulary both sides import.

Replica -> learner (calls on the OnlineLearner deployment handle):
- `updates_since(replica, ReplicaIdentity)`: what the replica holds; answered by an `UpdatesAnswer`
  (its kind, the learner's `LearnerInfo`, and object refs to `DeltaUpdate`s or one `FullUpdate`).
- `submit([FeedbackEvent, ...])`: answered by one `SubmitAnswer`: `Accepted`, `Conflict`,
  `NotOwnerAnswer` or `WriteFailed`.
- `status()`: answered by `LearnerStatus` (an owner with a base) or `StandbyStatus` (a standby, or
  an owner still adopting); `as_json()` is what GET /v1/model shows under "learner".
- `admit(client, auth_ok)`: a plain int (0, or the Retry-After seconds).

Fencing: everything the learner sends names the ownership `epoch` of the learner that made it
(0 from one that owns nothing), so a replica can ignore a superseded learner.

Only the standard library: this is the lowest layer of online_learning, below the learner
(online_learning/learner.py) and the replica side (serve/model_follower.py, serve/runner.py,
serve/feedback.py), and Ray pickles these classes through handles by reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

__all__ = ["FeedbackEvent", "ReplicaIdentity", "ReplicaReport", "LearnerInfo", "DeltaUpdate", "FullUpdate", "Update",
           "UpdatesAnswer", "UPDATE_KINDS", "Accepted", "Conflict", "NotOwnerAnswer", "WriteFailed", "SubmitAnswer",
           "LearnerStatus", "StandbyStatus"]


@dataclass(frozen=True)
class FeedbackEvent:
    """One labelled event, as a client sent it (checked by the replica, appended by the learner)."""

    event_id: str
    text: str
    label: str


# -- the model a replica holds -----------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaIdentity:
    """The weights a replica holds: named (lineage, version), with the digest of their values
    and the newest feedback event they include (`log_offset`, -1 for none). `lineage` and
    `digest` are None for a replica holding nothing the learner could name."""

    lineage: str | None
    version: int
    digest: str | None
    log_offset: int


@dataclass(frozen=True)
class ReplicaReport:
    """What the learner keeps of a replica's last `updates_since`: its identity, when it asked
    (`reported_at`: wall clock, for people; `seen`: the learner's monotonic clock, for intervals)."""

    lineage: str | None
    version: int
    digest: str | None
    log_offset: int
    reported_at: float
    seen: float

    @classmethod
    def of(cls, identity: ReplicaIdentity, reported_at: float, seen: float) -> ReplicaReport:
        return cls(identity.lineage, identity.version, identity.digest, identity.log_offset, reported_at, seen)


# -- updates_since -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LearnerInfo:
    """The learner's part of every `updates_since` answer.

    `identity` is what it publishes (None before its first lineage is published). `ready_offset`
    is its readiness target: a replica on another lineage is ready once it holds every event up to
    it; None while the learner has no target (a standby, or an owner still adopting its base).
    `owner` is False from a learner that does not own the feedback log."""

    epoch: int = 0
    owner: bool = True
    identity: ReplicaIdentity | None = None
    ready_offset: int | None = None
    published_at: float | None = None
    base_version: int | None = None  # the store version the published lineage started from

    @property
    def published(self) -> bool:
        return self.identity is not None


@dataclass(frozen=True, eq=False)
class DeltaUpdate:
    """The embedding rows touched since the previous version, and every other (dense) weight.
    Applies only to a replica holding `version - 1` of the same lineage."""

    kind: ClassVar[str] = "delta"
    version: int
    log_offset: int
    rows: Any  # int64 row indices, sorted
    row_values: Any  # float32 (len(rows), embedding width)
    dense: list  # every variable but the embedding, in model.weights order
    lineage: str = ""  # the name and digest are set by `named` once the publisher knows the digest
    digest: str = ""
    epoch: int = 0

    def named(self, lineage: str, digest: str, epoch: int) -> DeltaUpdate:
        return dataclasses.replace(self, lineage=lineage, digest=digest, epoch=epoch)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.row_values.nbytes + sum(a.nbytes for a in self.dense))


@dataclass(frozen=True, eq=False)
class FullUpdate:
    """Every weight: for a replica that missed versions, holds another lineage, or just started."""

    kind: ClassVar[str] = "full"
    version: int
    log_offset: int
    embedding: Any
    dense: list
    lineage: str = ""
    digest: str = ""
    epoch: int = 0
    # train.model.model_signature of the learner's model: a replica holding another model (equal
    # shapes, other features or labels) loads the base from the store instead; "" from older learners.
    signature: str = ""

    def named(self, lineage: str, digest: str, epoch: int) -> FullUpdate:
        return dataclasses.replace(self, lineage=lineage, digest=digest, epoch=epoch)

    @property
    def nbytes(self) -> int:
        return int(self.embedding.nbytes + sum(a.nbytes for a in self.dense))


Update = Union[DeltaUpdate, FullUpdate]

# wait: nothing to take yet (no lineage published, or a standby); none: up to date; relabel: the same
# weights under the learner's name; deltas: refs to one DeltaUpdate per missing version; full: a ref
# to one FullUpdate.
UPDATE_KINDS = ("wait", "none", "relabel", "deltas", "full")


@dataclass(frozen=True)
class UpdatesAnswer:
    """The answer to `updates_since`; `refs` are Ray object refs to the updates, in order."""

    kind: str
    learner: LearnerInfo
    refs: tuple = ()

    def __post_init__(self):
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"unknown update kind {self.kind!r}")


# -- submit ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    """Every event is durable: (offset, duplicate) per event, in request order."""

    results: tuple[tuple[int, bool], ...]


@dataclass(frozen=True)
class Conflict:
    """An event_id already names another event (at `offset`; None: twice in this request).
    Nothing of the request was written."""

    event_id: str
    offset: int | None


@dataclass(frozen=True)
class NotOwnerAnswer:
    """This learner does not own the log (a standby, or a superseded owner; `epoch` is the
    owner's): nothing written, the caller retries."""

    epoch: int
    message: str


@dataclass(frozen=True)
class WriteFailed:
    """The log could not be written (`errno`: its name, e.g. ENOSPC); nothing acknowledged."""

    errno: str
    message: str


SubmitAnswer = Union[Accepted, Conflict, NotOwnerAnswer, WriteFailed]


# -- status ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StandbyStatus:
    """`status` of a learner with nothing of its own to report yet: a standby, or an owner still
    adopting its base. Fields in the order GET /v1/model shows them."""

    owner: bool
    standby: bool
    epoch: int
    owner_epoch: int
    lineage: None = None
    version: None = None
    digest: None = None
    published_at: None = None
    replaying: bool = False
    pid: int = 0
    publish_interval_s: float = 0.0
    max_staleness_s: float = 0.0
    replicas: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LearnerStatus:
    """`status` of the owner once it has a base: what it serves (lineage, version, digest: None
    before its first publish), the lineage it replays towards, offsets, counts, the replicas it
    heard from (`ReplicaReport`s by replica), its last rounds (`history`: one record per round,
    publish or adoption), outcome counters and the log's figures. Fields in the order GET /v1/model
    shows them."""

    lineage: str | None
    version: int | None
    digest: str | None
    published_at: float | None
    replaying: bool
    next_lineage: str | None
    base_version: int | None
    next_base_version: int | None
    ready_offset: int
    judged_offset: int
    compacted_unlearned: int
    applied_offset: int
    served_offset: int | None
    log_length: int
    replayed_on_start: int
    pending: int
    held_back: int
    refused: int
    followups_left: int
    pid: int
    staleness_s: float
    owner: bool
    standby: bool
    epoch: int
    fenced: str | None
    publish_interval_s: float
    max_staleness_s: float
    replicas: dict  # replica -> ReplicaReport
    history: list  # dicts, newest last
    feedback_outcomes: dict
    log: dict

    def as_json(self) -> dict:
        return dataclasses.asdict(self)
