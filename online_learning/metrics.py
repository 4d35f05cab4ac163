"""The learning loop's metrics: the one place that names them, through Ray's metrics API.

Ray's own Prometheus endpoint (one per node, found through /tmp/ray/prom_metrics_service_discovery.json)
exports them with the prefix `ray_`: `textserve_learner_publishes_total` here is
`ray_textserve_learner_publishes_total` in Prometheus. No second HTTP server.

Recorded per round (the learner's training thread), per submit (the learner's feedback call,
itself a batch of events), per poll (a replica's follower), never per predict request: the predict
path stays as it is. Label sets are bounded: `replica` (one per live replica, as Ray Serve's own
metrics have), `reason`, `outcome` and `kind` from the fixed tuples below; never a text, an event
id, a client address or a lineage.

Counters end in `_total` in code: Ray's exporter keeps such a name as it is (a counter named
without it would come out as `<name>_total` plus a deprecated gauge `<name>`). Units are in the
names (`_seconds`, `_bytes`), except two replica gauges whose names dashboards and alerts use
(`textserve_model_version`, `textserve_replica_staleness_s`).

Wiring: `LearnerMetrics` in the learner (online_learning/learner.py), `ReplicaMetrics` in each
replica's follower (serve/model_follower.py); one call per place, see each method. The pure
parts (`held_back_kind`, `submit_outcome`, `newly_served`) need no Ray and are unit-tested.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from online_learning.protocol import Accepted, Conflict, NotOwnerAnswer, SubmitAnswer, WriteFailed
from online_learning.round_policy import NO_HOLDOUT

__all__ = ["PREFIX", "METRICS", "HELD_BACK_KINDS", "EVENT_OUTCOMES", "SUBMIT_OUTCOMES", "PUBLISH_KINDS",
           "held_back_kind", "submit_outcome", "newly_served", "LearnerMetrics", "ReplicaMetrics",
           "exported_names"]

PREFIX = "ray_"  # what Ray's exporter puts before every application metric's name

# Bounded label values. A reason outside these reads as "other", never as its text.
HELD_BACK_KINDS = ("base", "feedback", "no_holdout", "other")
EVENT_OUTCOMES = ("refused", "deferred", "rejected", "conflicting")  # refused: the contradiction check
SUBMIT_OUTCOMES = ("accepted", "duplicate", "conflict", "not_owner", "write_error", "other")
PUBLISH_KINDS = ("delta", "lineage")  # a delta on the current lineage, or a new lineage's first version

# Buckets. Seconds from an acknowledged event to a replica serving it: the default bound
# (max_staleness_s) is 10 s, so the buckets straddle it finely and reach far past it.
ACK_TO_SERVED_BUCKETS_S = [0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600]
ROUND_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]  # small model: ~0.1 s
PUBLISH_BUCKETS_BYTES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20,
                         256 << 20, 1 << 30]  # a small delta is KBs; a large model's full weights ~300 MB

# name -> (type, description, label keys). The single list: recorders below, the dashboard and
# alert checks (tests/test_observability.py) read names from here.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # the learner (one per application)
    "textserve_learner_publishes_total": ("counter", "versions published, by kind (delta, lineage)", ("kind",)),
    "textserve_learner_held_back_rounds_total": ("counter", "candidates the gate held back, by reason kind",
                                                 ("reason",)),
    "textserve_learner_held_back_streak": ("gauge", "held-back rounds in a row since the last publish", ()),
    "textserve_learner_events_total": ("counter", "feedback events refused (contradiction check), deferred "
                                       "(to a fine-tune), rejected (judged bad) or conflicting (event id)",
                                       ("outcome",)),
    "textserve_learner_rounds_failed_total": ("counter", "learner rounds that raised (retried next round)", ()),
    "textserve_learner_failed_rounds_in_row": ("gauge", "learner rounds failed in a row (10 fails its health check)",
                                               ()),
    "textserve_learner_version": ("gauge", "the version the learner publishes", ()),
    "textserve_learner_log_bytes": ("gauge", "bytes of the feedback log on disk", ()),
    "textserve_learner_log_segments": ("gauge", "segment files of the feedback log", ()),
    "textserve_learner_unjudged_events": ("gauge", "events acknowledged but not yet judged (the backlog)", ()),
    "textserve_learner_publish_bytes": ("histogram", "bytes of one publish (a delta, or a lineage's weights)", ()),
    "textserve_learner_round_seconds": ("histogram", "seconds of one training round (train, gate, publish)", ()),
    "textserve_feedback_requests_total": ("counter", "feedback submits the learner answered, by outcome",
                                          ("outcome",)),
    "textserve_feedback_events_total": ("counter", "feedback events in accepted submits (accepted, duplicate)",
                                        ("outcome",)),
    "textserve_replica_ack_to_served_seconds": ("histogram", "seconds from an event's acknowledgement to a replica "
                                                "reporting it serves a version that includes it", ("replica",)),
    # each replica (serve/model_follower.py); the first two names are the ones dashboards use
    "textserve_model_version": ("gauge", "model version served", ("replica",)),
    "textserve_replica_staleness_s": ("gauge", "seconds since this replica last held the learner's current version",
                                      ("replica",)),
    "textserve_replica_max_staleness_seconds": ("gauge", "the staleness bound (max_staleness_s) this replica "
                                                "is held to", ("replica",)),
    "textserve_replica_lineage_changes_total": ("counter", "times this replica began serving another lineage",
                                                ("replica",)),
}

_BUCKETS = {"textserve_learner_publish_bytes": PUBLISH_BUCKETS_BYTES,
            "textserve_learner_round_seconds": ROUND_BUCKETS_S,
            "textserve_replica_ack_to_served_seconds": ACK_TO_SERVED_BUCKETS_S}


def exported_names() -> set[str]:
    """Every series name Prometheus sees for METRICS (histograms as _bucket, _sum, _count)."""
    names = set()
    for name, (kind, _, _) in METRICS.items():
        full = PREFIX + name
        names |= {full + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {full}
    return names


def _make(name: str):
    from ray.util import metrics

    kind, description, tags = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tags)
    return metrics.Histogram(name, description, boundaries=_BUCKETS[name], tag_keys=tags)


# -- pure parts (no Ray) -----------------------------------------------------------------------

def held_back_kind(reason: str | None) -> str:
    """The bounded label for a gate's reason text (round_policy.gate_reason)."""
    if not reason:
        return "other"
    if reason == NO_HOLDOUT:
        return "no_holdout"
    if reason.startswith("base"):
        return "base"
    if reason.startswith("feedback"):
        return "feedback"
    return "other"


def submit_outcome(reply: SubmitAnswer) -> tuple[str, int, int]:
    """(outcome, events accepted, duplicates) of the learner's answer to `submit`. A submit whose
    every event is a duplicate is "duplicate"; one with any new event is "accepted"."""
    for kind, outcome in ((NotOwnerAnswer, "not_owner"), (WriteFailed, "write_error"), (Conflict, "conflict")):
        if isinstance(reply, kind):
            return outcome, 0, 0
    if not isinstance(reply, Accepted):
        return "other", 0, 0
    dups = sum(1 for _, dup in reply.results if dup)
    fresh = len(reply.results) - dups
    return ("accepted" if fresh else "duplicate"), fresh, dups


def newly_served(acked: Iterable[tuple[int, float]], before: int | None, now_offset: int | None,
                 now: float) -> list[float]:
    """Seconds from acknowledgement to now for each acknowledged event (offset, ack time) that a
    replica serves now (offset <= `now_offset`) and did not at its previous report (offset >
    `before`). Nothing for a replica's first report (`before` None: it did not exist when those
    events were acknowledged) or one that went back (a restart on an older base).
    `acked` is in offset order (ReplicaReports.acked), so the scan stops at the first offset past
    `now_offset`."""
    if before is None or now_offset is None or now_offset <= before:
        return []
    out = []
    for offset, acked_at in acked:
        if offset > now_offset:
            break
        if offset > before:
            out.append(max(0.0, now - acked_at))
    return out


# -- recorders -----------------------------------------------------------------------------------

class LearnerMetrics:
    """The learner's metrics. Create once in OnlineLearner.__init__; every method is one call at
    one place of the learner (named in its docstring); none runs per predict request."""

    def __init__(self):
        self._m = {name: _make(name) for name in METRICS
                   if name.startswith(("textserve_learner_", "textserve_feedback_", "textserve_replica_ack"))}
        self.held_back_streak = 0
        self.failed_in_row = 0
        self.last_reports: dict[str, int | None] = {}  # replica -> log_offset at its previous report
        self.tally: Counter = Counter()  # the counters' totals since this learner started, for status()
        self._set_gauges()  # a new learner (a restart) shows 0s at once, not the old process' last values

    def counts(self) -> dict:
        """Totals since this learner started, for OnlineLearner.status() ("feedback_outcomes"):
        {"requests": {outcome: n}, "events": {outcome: n}, "held_back": {reason: n}, "publishes": n}."""
        out: dict = {"requests": {}, "events": {}, "held_back": {}, "publishes": self.tally["publishes"]}
        for key, n in self.tally.items():
            group, _, name = key.partition(":")
            if name and n:
                out[group][name] = n
        return out

    def submitted(self, reply: SubmitAnswer) -> None:
        """OnlineLearner.submit, on each answer it returns."""
        outcome, fresh, dups = submit_outcome(reply)
        self._m["textserve_feedback_requests_total"].inc(tags={"outcome": outcome})
        self.tally[f"requests:{outcome}"] += 1
        self.tally["events:accepted"] += fresh
        self.tally["events:duplicate"] += dups
        if fresh:
            self._m["textserve_feedback_events_total"].inc(fresh, tags={"outcome": "accepted"})
        if dups:
            self._m["textserve_feedback_events_total"].inc(dups, tags={"outcome": "duplicate"})
        if outcome == "conflict":
            self.tally["events:conflicting"] += 1
            self._m["textserve_learner_events_total"].inc(tags={"outcome": "conflicting"})

    def events(self, outcome: str, count: int) -> None:
        """Where the learner marks events: "refused" (contradiction check), "deferred", "rejected"."""
        if outcome not in EVENT_OUTCOMES:
            raise ValueError(f"unknown event outcome {outcome!r}; one of {EVENT_OUTCOMES}")
        if count > 0:
            self.tally[f"events:{outcome}"] += count
            self._m["textserve_learner_events_total"].inc(count, tags={"outcome": outcome})

    def round_done(self, entry: dict, took_s: float) -> None:
        """OnlineLearner._run, after a round succeeded (`entry`: the history entry the round
        appended, `took_s`: its seconds). Publishes, hold-backs, bytes per publish, step time."""
        self._m["textserve_learner_round_seconds"].observe(max(0.0, took_s))
        if entry.get("replay"):
            return  # replaying a new lineage: neither published nor held back
        if entry.get("published"):
            self.published(entry.get("version"), entry.get("bytes") or 0, "delta")
        elif "reason" in entry:
            self.held_back_streak += 1
            self.tally[f"held_back:{held_back_kind(entry['reason'])}"] += 1
            self._m["textserve_learner_held_back_rounds_total"].inc(tags={"reason": held_back_kind(entry["reason"])})
            self._m["textserve_learner_held_back_streak"].set(self.held_back_streak)

    def published(self, version: int | None, nbytes: int, kind: str = "lineage") -> None:
        """Counted by round_done for a delta; OnlineLearner._publish_lineage calls it for a lineage."""
        if kind not in PUBLISH_KINDS:
            raise ValueError(f"unknown publish kind {kind!r}; one of {PUBLISH_KINDS}")
        self.held_back_streak = 0
        self.tally["publishes"] += 1
        self._m["textserve_learner_held_back_streak"].set(0)
        self._m["textserve_learner_publishes_total"].inc(tags={"kind": kind})
        if nbytes > 0:
            self._m["textserve_learner_publish_bytes"].observe(nbytes)
        if version is not None:
            self._m["textserve_learner_version"].set(version)

    def round_failed(self, in_row: int) -> None:
        """OnlineLearner._run, in `except Exception` after `self._failed_rounds += 1`; and with 0
        after a round succeeded (where `self._failed_rounds = 0`)."""
        if in_row > 0:
            self._m["textserve_learner_rounds_failed_total"].inc()
        self.failed_in_row = in_row
        self._m["textserve_learner_failed_rounds_in_row"].set(in_row)

    def _set_gauges(self) -> None:
        self._m["textserve_learner_held_back_streak"].set(self.held_back_streak)
        self._m["textserve_learner_failed_rounds_in_row"].set(self.failed_in_row)

    def log_state(self, stats: dict, judged_offset: int) -> None:
        """Every pass of OnlineLearner._run, idle ones included (FeedbackLog.stats(), the judged
        offset): log size and the acknowledged-but-unjudged backlog, and the streak gauges again,
        so all of them are current while the learner waits, replays or fails."""
        self._set_gauges()
        self._m["textserve_learner_log_bytes"].set(stats.get("disk_bytes", 0))
        self._m["textserve_learner_log_segments"].set(stats.get("segments", 0))
        self._m["textserve_learner_unjudged_events"].set(max(0, stats.get("next_offset", 0) - 1 - judged_offset))

    def replica_report(self, replica: str, log_offset: int | None, acked: Iterable[tuple[int, float]],
                       now: float | None = None) -> None:
        """OnlineLearner.updates_since, after `self.reports.report(...)` and before `prune`: the
        ack-to-served seconds of every event this replica serves now and did not at its last report
        (`acked`: ReplicaReports.acked; `log_offset`: the identity's log_offset; `now` on the
        clock of `acked`'s ack times: ReplicaReports.clock(), monotonic)."""
        now = time.time() if now is None else now
        before = self.last_reports.get(replica)
        self.last_reports[replica] = log_offset
        hist = self._m["textserve_replica_ack_to_served_seconds"]
        for seconds in newly_served(acked, before, log_offset, now):
            hist.observe(seconds, tags={"replica": replica})
        if len(self.last_reports) > 1000:  # replicas come and go under autoscaling: forget the oldest
            self.last_reports.pop(next(iter(self.last_reports)))


class ReplicaMetrics:
    """One replica's metrics (serve/model_follower.py). Per install or poll, never per request."""

    def __init__(self, replica: str, max_staleness_s: float | None = None):
        self.replica = replica
        self._tags = {"replica": replica}
        self._m = {name: _make(name) for name in ("textserve_model_version", "textserve_replica_staleness_s",
                                                  "textserve_replica_max_staleness_seconds",
                                                  "textserve_replica_lineage_changes_total")}
        self.lineage: str | None = None
        self.lineage_changes = 0
        if max_staleness_s:
            self._m["textserve_replica_max_staleness_seconds"].set(max_staleness_s, tags=self._tags)

    def served(self, version: int, lineage: str | None) -> None:
        """ModelFollower._install and the end of ModelFollower.apply (in place of
        `self._version_gauge.set(...)`): the version served, and a lineage change counted."""
        self._m["textserve_model_version"].set(version, tags=self._tags)
        if lineage is not None and self.lineage is not None and lineage != self.lineage:
            self.lineage_changes += 1
            self._m["textserve_replica_lineage_changes_total"].inc(tags=self._tags)
        if lineage is not None:
            self.lineage = lineage

    def staleness(self, seconds: float) -> None:
        """ModelFollower._follow after each poll (in place of `self._staleness_gauge.set(...)`)."""
        self._m["textserve_replica_staleness_s"].set(max(0.0, seconds), tags=self._tags)
