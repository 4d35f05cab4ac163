"""Which events a learner round reads from a real feedback log (round_policy.next_batch): never an
event past the offset a replay may reach, never a compacted gap passed over without a word. No Ray,
no TensorFlow."""

from __future__ import annotations

from online_learning.feedback_log import FeedbackEvent, FeedbackLog
from online_learning.round_policy import next_batch


def _log(tmp_path, n=100):
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=0)
    for lo in range(0, n, 5):
        log.append([FeedbackEvent(f"id-{i}", f"text {i}", "L") for i in range(lo, lo + 5)])
    return log


def test_a_replay_over_a_compacted_gap_stops_at_the_ready_offset_and_reports_the_gap(tmp_path):
    log = _log(tmp_path)
    # A base whose snapshot holds events up to 29, while the log was compacted below 50 (against
    # a newer snapshot); the replay may reach only offset 55 (judged before this lineage began).
    assert log.compact(50) == 50 and log.first_offset == 50
    batch, skipped = next_batch(log, applied=29, ready=55, max_events=100)
    assert [e.offset for e in batch] == [50, 51, 52, 53, 54, 55]
    assert skipped == 20
    # nothing compacted in between: nothing skipped, and the ready offset still bounds the batch
    batch, skipped = next_batch(log, applied=51, ready=55, max_events=100)
    assert [e.offset for e in batch] == [52, 53, 54, 55] and skipped == 0
    batch, skipped = next_batch(log, applied=29, ready=40, max_events=100)  # all of it compacted
    assert batch == [] and skipped == 20


def test_live_rounds_take_at_most_max_events_from_the_first_offset_still_there(tmp_path):
    log = _log(tmp_path)
    log.compact(50)
    batch, skipped = next_batch(log, applied=29, ready=None, max_events=8)
    assert [e.offset for e in batch] == list(range(50, 58)) and skipped == 20
    batch, skipped = next_batch(log, applied=97, ready=None, max_events=8)
    assert [e.offset for e in batch] == [98, 99] and skipped == 0
    log.close()


def test_restarts_on_snapshots_keep_the_lineage_anchor_so_base_accuracy_cannot_ratchet_down():
    from online_learning.round_policy import lineage_anchor
    from online_learning.settings import LearnerSettings

    drop = LearnerSettings().max_base_drop
    anchor = lineage_anchor({"kind": None}, 0.965)  # a trained base: its own first version
    assert anchor == 0.965
    # Worst case each time: the snapshot a restart starts from scores a full max_base_drop below
    # the anchor (the most the gate lets through). Five restarts later the bar has not moved.
    for _ in range(5):
        snapshot = {"kind": "online-snapshot", "anchor_base_accuracy": anchor}
        anchor = lineage_anchor(snapshot, anchor - drop)
    assert anchor == 0.965
    assert lineage_anchor({"kind": "online-snapshot", "anchor_base_accuracy": 0.9}, 0.95) == 0.95  # never lower
    assert lineage_anchor({"kind": "online-snapshot", "anchor_base_accuracy": None}, 0.95) == 0.95  # none kept
    assert lineage_anchor({"kind": "fine-tune", "anchor_base_accuracy": 0.99}, 0.95) == 0.95  # a new base
