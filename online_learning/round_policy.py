"""The learner's round policy as plain functions: which events are held out, when the gate holds
a candidate back, how many follow-up rounds a round owes. No Ray, no TensorFlow: the learner
(learner.py) measures, these decide."""

from __future__ import annotations

import zlib

__all__ = ["is_holdout", "gate_reason", "owed_followups", "Followups", "NO_HOLDOUT", "next_batch", "lineage_anchor"]

NO_HOLDOUT = "no holdout to judge by"


def is_holdout(salt: str, offset: int, percent: float) -> bool:
    """Whether the event at `offset` is held out of training for the gate. Drawn from the
    learner's own secret and the offset it assigned, so a client cannot choose which of its
    events are held out."""
    return zlib.crc32(f"{salt}:{offset}".encode()) % 100 < percent


def gate_reason(s, base_acc: float | None, anchor: float, fb_acc: float | None, served_fb: float | None,
                fb_size: int) -> str | None:
    """Why the gate holds a candidate back, or None to publish it. Base data and feedback are
    scored apart: hold back when base accuracy falls more than `max_base_drop` below the
    lineage's anchor (so losses cannot ratchet over publishes), when the feedback holdout falls
    more than `gate_margin` below the served version's (and by at least `gate_min_losses`
    answers: 1 of 3 held-out events is not evidence), or when there is no holdout at all to
    judge by. A reason starting with "base" is the base check alone (the learner may repair)."""
    if base_acc is None and fb_acc is None:
        return NO_HOLDOUT
    if base_acc is not None and base_acc < anchor - s.max_base_drop:
        return f"base accuracy {base_acc:.3f} < anchor {anchor:.3f} - {s.max_base_drop}"
    if (fb_acc is not None and fb_acc < served_fb - s.gate_margin
            and round((served_fb - fb_acc) * fb_size) >= s.gate_min_losses):
        return f"feedback holdout {fb_acc:.3f} < served {served_fb:.3f} - {s.gate_margin}"
    return None


def owed_followups(s, left: float, learned: int, replaying: bool = False) -> float:
    """Replay-only rounds owed once a round has learned (kept) `learned` new events, `left` being
    owed before it: each event adds its share, `followup_passes` replays of it in rounds of
    `followup_replay_events` (fractions of a round add up), the total at least
    `followup_min_rounds` (a single correction) and at most `followup_rounds`. A later event adds
    its own share to what is left, never the whole maximum again, so a trickle after a burst
    costs what a trickle costs. Replaying the log after a restart owes only the minimum: the
    replicas wait for that lineage."""
    floor = min(s.followup_min_rounds, s.followup_rounds)
    if learned <= 0:
        return left
    if replaying:
        return max(left, floor)
    more = s.followup_passes * learned / s.followup_replay_events
    return max(floor, min(s.followup_rounds, left + more))


class Followups:
    """The follow-up rounds owed (replay-only rounds after new events), kept once a round has
    succeeded: a round of new events owes more; a follow-up round pays one (counted after it
    ran, so none left means no publish is still coming)."""

    def __init__(self, s):
        self.s = s
        self.left = 0.0  # replay-only rounds owed (fractions add up)
        self.burst_events = 0  # new events learned since the follow-up rounds last ran out

    def after_round(self, had_events: bool, kept: int, replaying: bool) -> None:
        if had_events:
            self.burst_events += kept
            self.left = owed_followups(self.s, self.left, kept, replaying)
        elif self.left > 0:
            self.left = max(0.0, self.left - 1)
        if not self.left:
            self.burst_events = 0


def next_batch(log, applied: int, ready: int | None, max_events: int) -> tuple[list, int]:
    """The next events to learn from `log` after `applied` (the last offset the learner's copy
    holds), at most `max_events`, and none past `ready` when it is given (a replay: events after
    it are judged as new feedback once the lineage is published). Also returns how many offsets
    after `applied` compaction already deleted (the base is older than the compaction): those are
    lost to this lineage, and the caller says so."""
    start = max(applied + 1, log.first_offset)  # below first_offset: deleted by compaction
    limit = max_events
    if ready is not None:  # counted from where the batch starts, not from `applied`
        limit = min(limit, ready - start + 1)
    skipped = start - (applied + 1)
    if limit <= 0:
        return [], skipped
    return log.read_from(start, limit=limit), skipped


def lineage_anchor(base_metrics: dict, measured: float) -> float:
    """The base accuracy a new lineage's gate holds its candidates to. A lineage started from the
    learner's own snapshot (a restart) keeps the anchor that snapshot's lineage had, recorded in
    it: re-measuring would let every restart lower the bar by up to `max_base_drop` again. A base
    trained on all the data (a plain retrain, a fine-tune) sets a new one: `measured`, its own
    first version's accuracy. A restart never lowers the bar: the higher of the two."""
    recorded = base_metrics.get("anchor_base_accuracy")
    if base_metrics.get("kind") == "online-snapshot" and isinstance(recorded, (int, float)) and recorded == recorded:
        return max(float(recorded), measured) if measured == measured else float(recorded)
    return measured
