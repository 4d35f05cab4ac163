"""The feedback log's durability and idempotency, and the learner's deltas (no Ray needed)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from online_learning.feedback_log import FeedbackEvent, FeedbackLog
from online_learning.settings import LearnerSettings
from online_learning.trainer import OnlineTrainer
from tests._helpers import write_jsonl
from online_learning.weights import apply_update, embedding_variable, make_delta, make_full
from train.model import load_model_dir, new_model, save_model_dir


def ev(i, label="HassTurnOn"):
    return FeedbackEvent(f"id-{i}", f"text {i}", label)


def test_log_appends_in_order_and_is_idempotent(tmp_path):
    log = FeedbackLog(tmp_path)
    assert log.append([ev(0), ev(1)]) == [(0, False), (1, False)]
    assert log.append([ev(1), ev(2), ev(2)]) == [(1, True), (2, False), (2, True)]
    assert len(log) == 3
    assert [e.event_id for e in log.read_from(1)] == ["id-1", "id-2"]


def test_log_survives_reopen_and_drops_a_torn_last_write(tmp_path):
    log = FeedbackLog(tmp_path)
    log.append([ev(0), ev(1)])
    log.close()
    with open(log.active_path, "ab") as f:
        f.write(b'{"offset": 2, "event_id": "id-2", "te')  # a crash mid-write: never acknowledged
    again = FeedbackLog(tmp_path)
    assert len(again) == 2
    assert again.append([ev(0), ev(2)]) == [(0, True), (2, False)]
    assert [e.offset for e in again.read_from(0)] == [0, 1, 2]


@pytest.mark.parametrize("arch, char_ngrams", [("lstm", ()), ("cnn", ()), ("lstm", (2, 3, 4))])
def test_lazy_adam_delta_is_exactly_what_changed_and_applies(tmp_path, arch, char_ngrams):
    labels = ["HassTurnOn", "HassTurnOff"]
    base = new_model("small", labels, arch, char_ngrams)
    save_model_dir(base, tmp_path / "base")
    learner, replica = load_model_dir(tmp_path / "base"), load_model_dir(tmp_path / "base")
    before = embedding_variable(learner.model).numpy().copy()
    trainer = OnlineTrainer(learner, 3e-3)
    for _ in range(3):  # several steps: plain Adam would move rows touched only in step 1 again
        trainer.train(["turn on the lamp", "switch off the fan now"], labels, batch_size=2)
    trainer.train(["open sesame"], ["HassTurnOn"], batch_size=1)
    after = embedding_variable(learner.model).numpy()
    changed = set(np.nonzero(np.any(before != after, axis=1))[0].tolist())
    touched = trainer.take_touched()
    assert changed and changed <= touched
    delta = make_delta(learner.model, touched, version=2, log_offset=5)
    full_bytes = make_full(learner.model, 2, 5).nbytes
    assert delta.nbytes < full_bytes / 10
    apply_update(replica.model, delta)
    texts = ["turn on the lamp", "open sesame", "unrelated words"]
    np.testing.assert_array_equal(replica.predict(texts), learner.predict(texts))


def test_reset_optimizer_restarts_like_a_fresh_one(tmp_path):
    """After a held-back candidate (weights restored, optimiser reset), the next step is the one a
    fresh learner would take from the same weights: zeroed moments under an old step count would
    make it several times the learning rate (what kept a `make demo` run holding back)."""
    labels = ["HassTurnOn", "HassTurnOff"]
    save_model_dir(new_model("small", labels), tmp_path / "base")
    used, fresh = load_model_dir(tmp_path / "base"), load_model_dir(tmp_path / "base")
    start = used.model.get_weights()
    trainer = OnlineTrainer(used, 3e-3)
    for _ in range(50):  # a candidate that is then held back
        trainer.train(["turn on the lamp", "switch off the fan now"], labels, batch_size=2)
    used.model.set_weights(start)
    trainer.reset_optimizer(trainer.take_touched())
    batch = (["turn on the fan", "switch off the lamp"], ["HassTurnOn", "HassTurnOff"])
    trainer.train(*batch, batch_size=2)
    OnlineTrainer(fresh, 3e-3).train(*batch, batch_size=2)
    for a, b in zip(used.model.get_weights(), fresh.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_contradiction_check_flags_confident_disagreement_and_judges_rounds_and_trickles():
    from online_learning.contradiction import ContradictionCheck

    labels = ["HassTurnOn", "HassTurnOff"]
    sure = new_model("small", labels)
    classes = sure.model.get_layer("classes")
    kernel, _ = classes.get_weights()
    classes.set_weights([np.zeros_like(kernel), np.array([12.0, 0.0], dtype=np.float32)])  # always On, p~0.99999
    check = ContradictionCheck(share=0.5, confidence=0.9, window=64, min_events=8)
    assert check.flags(sure, ["turn it on", "switch it off"], ["HassTurnOn", "HassTurnOff"]) == [False, True]
    unsure = new_model("small", labels)  # untrained: ~0.5 each, never confident
    assert check.flags(unsure, ["switch it off"] * 3, ["HassTurnOff"] * 3) == [False] * 3

    def fresh(**kw):
        return ContradictionCheck(**{"share": 0.5, "confidence": 0.9, "window": 64, "min_events": 8, **kw})
    assert fresh().verdict([True] * 8).startswith("contradicts")  # a round big enough on its own
    assert fresh().verdict([True] * 7) is None  # too small, and no stream yet
    assert fresh().verdict([True] * 4 + [False] * 5) is None  # under half
    trickle = fresh()
    verdicts = [trickle.verdict([True]) for _ in range(10)]  # one poisoned event per round
    assert verdicts[:7] == [None] * 7 and all(v and "last 8 events" in v for v in verdicts[7:8])
    assert trickle.verdict([False, False]) is None  # clean events right after: not refused for the window
    corrections = fresh()
    for _ in range(10):
        assert corrections.verdict([False] * 9) is None
    assert corrections.verdict([True]) is None  # one correction of a confident mistake in clean traffic
    assert fresh(share=1.0).verdict([True] * 20) is None  # 1: off
    with pytest.raises(ValueError, match="contradiction_window"):
        LearnerSettings(contradiction_window=8, contradiction_min_events=32)


def test_learner_settings_reject_unreachable_staleness_and_typos():
    with pytest.raises(ValueError, match="max_staleness_s .* must exceed"):
        LearnerSettings(publish_interval_s=5, max_staleness_s=2)
    from serve.settings import AppSettings, parse_settings

    with pytest.raises(ValueError, match=r"learner\.publish_interval: unknown key \(typo\?\)"):
        parse_settings(AppSettings, {"learner": {"publish_interval": 1}}, "application args")


def test_follow_up_rounds_grow_with_the_burst_between_their_bounds():
    """A burst is replayed about followup_passes times: the three rounds of the Korean stream
    (1,532 events, a tenth held out) owe the 24 rounds they needed in bench drift, a single
    correction the 6 it always had, and events add their own share (fractions of a round add up):
    a trickle, after a burst or one event per round, never owes the whole maximum again."""
    import math

    from online_learning.round_policy import owed_followups

    s = LearnerSettings()
    left = 0.0
    for learned in (460, 460, 459):  # one burst, three rounds of new events
        left = owed_followups(s, left, learned)
    assert math.ceil(left) == 24
    assert owed_followups(s, 0, 1) == 6  # a single correction
    left = 0.0
    for _ in range(40):  # one event per round, 40 rounds in a row (an attacking client measured 24 before)
        left = owed_followups(s, left, 1)
    assert math.ceil(left) == 7
    assert owed_followups(s, 10, 1) < 10.1  # a trickle after a burst adds its share
    assert owed_followups(s, 5, 0) == 5  # a round that kept nothing (refused, held back) owes nothing, cancels nothing
    assert owed_followups(s, 0, 1532, replaying=True) == 6  # replicas wait for a replaying lineage
    assert owed_followups(LearnerSettings(followup_rounds=0), 0, 1532) == 0  # 0 turns follow-ups off
    with pytest.raises(ValueError, match="followup_replay_events"):
        LearnerSettings(followup_replay_events=0)


def test_same_id_with_another_payload_is_a_conflict_and_writes_nothing(tmp_path):
    from online_learning.feedback_log import EventIdConflict

    log = FeedbackLog(tmp_path)
    log.append([FeedbackEvent("a", "turn on the light", "HassTurnOn")])
    with pytest.raises(EventIdConflict, match="'a'"):  # a resend with another label
        log.append([FeedbackEvent("b", "stop", "HassTurnOff"), FeedbackEvent("a", "turn on the light", "HassTurnOff")])
    with pytest.raises(EventIdConflict, match="'c'"):  # the same id twice in one batch, two labels
        log.append([FeedbackEvent("c", "x", "HassTurnOn"), FeedbackEvent("c", "x", "HassTurnOff")])
    assert len(log) == 1 and [e.event_id for e in log.read_from(0)] == ["a"]  # nothing of either batch
    assert log.append([FeedbackEvent("a", "turn on the light", "HassTurnOn")]) == [(0, True)]  # a true resend
    log.close()
    with pytest.raises(EventIdConflict):  # the payloads are known again after a restart
        FeedbackLog(tmp_path).append([FeedbackEvent("a", "other text", "HassTurnOn")])


def test_cli_default_ids_follow_the_content_not_the_file_name(tmp_path):
    from online_learning.send import read_events

    (tmp_path / "day1").mkdir()
    (tmp_path / "day2").mkdir()
    write_jsonl(tmp_path / "day1" / "feedback.jsonl", [{"text": "turn on the light", "label": "HassTurnOn"}])
    write_jsonl(tmp_path / "day2" / "feedback.jsonl", [{"text": "stop the fan", "label": "HassTurnOff"},
                                                        {"text": "turn on the light", "label": "HassTurnOn"}])
    day1 = read_events(str(tmp_path / "day1" / "feedback.jsonl"))
    day2 = read_events(str(tmp_path / "day2" / "feedback.jsonl"))
    assert day1[0]["event_id"] != day2[0]["event_id"]  # same file name and row, another event
    assert day1[0]["event_id"] == day2[1]["event_id"]  # the same event is the same id wherever it is


class _FeedbackStandIn:
    """/v1/feedback on 127.0.0.1 for the send CLI: requests get the answers of `script` in turn (a
    status with the app's JSON error shape and a Retry-After, or None: accepted), then all are
    accepted: 202 with what a real FeedbackLog in `log_dir` acknowledged."""

    def __init__(self, log_dir, script: list[tuple[int, str] | None]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from serve.requests import RequestError, error_body

        self.log, self.script, self.seen, lock = FeedbackLog(log_dir), list(script), [], threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                import json

                events = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stand_in.seen.append((time.monotonic(), [e["event_id"] for e in events]))
                    refusal = stand_in.script.pop(0) if stand_in.script else None
                    if refusal is None:
                        results = stand_in.log.append([FeedbackEvent(e["event_id"], e["text"], e["label"])
                                                       for e in events])
                if refusal:
                    status, retry_after = refusal
                    code = {429: "rate_limited", 503: "learner_unavailable", 507: "log_write_failed"}[status]
                    body = error_body(RequestError(status, code, "refused by the test's script"))
                    headers = {"Retry-After": retry_after}
                else:
                    status, headers = 202, {}
                    body = json.dumps({"accepted": sum(not d for _, d in results),
                                       "duplicates": sum(d for _, d in results),
                                       "offsets": [o for o, _ in results]}).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.log.close()


def test_send_retries_a_full_disk_with_backoff_and_every_event_arrives_once(tmp_path):
    """507 log_write_failed (the log's disk is full, nothing written) is retried like 429/503, after
    0.5 s, 1 s, 2 s... capped at the server's Retry-After (30 s), not 30 s every time."""
    from online_learning.send import send

    events = [{"event_id": f"disk-{i}", "text": f"turn on light {i}", "label": "HassTurnOn"} for i in range(10)]
    script = [(507, "30"), (507, "30"), (507, "30"), None,  # the first batch: three refusals, then 202
              (503, "0.2"), (507, "30"), None]  # the second: a learner handover, then the disk again
    with _FeedbackStandIn(tmp_path / "log", script) as server:
        start = time.monotonic()
        summary = send(server.url, events, "token", batch=4, progress=False)
        elapsed = time.monotonic() - start
        logged = [e.event_id for e in server.log.read_from(0)]
        tries = [ids for _, ids in server.seen]
        gaps = [round(b - a, 1) for (a, _), (b, _) in zip(server.seen, server.seen[1:])]
    assert summary == {"sent": 10, "accepted": 10, "duplicates": 0, "conflicts": 0, "failed": 0, "errors": []}
    assert logged == [e["event_id"] for e in events]  # every event, once, in order
    assert len(tries) == 3 + 1 + 2 + 1 + 1 and tries[:4] == [tries[0]] * 4  # retried, the same batch each time
    assert gaps[:3] == pytest.approx([0.5, 1.0, 2.0], abs=0.3)  # backoff, not the 30 s Retry-After each time
    assert gaps[4:6] == pytest.approx([0.2, 1.0], abs=0.3)  # 503: its Retry-After; 507: the backoff
    assert 4.5 <= elapsed < 10, (elapsed, gaps)


def test_send_gives_up_on_a_full_disk_after_its_retries(tmp_path):
    """A disk that stays full: each batch is tried max_retries + 1 times, then counted as failed."""
    from online_learning.send import main, send

    events = [{"event_id": f"full-{i}", "text": f"stop the fan {i}", "label": "HassTurnOff"} for i in range(3)]
    with _FeedbackStandIn(tmp_path / "log", [(507, "0.05")] * 100) as server:
        summary = send(server.url, events, "token", batch=2, progress=False, max_retries=3)
        assert len(server.seen) == 2 * 4 and len(server.log) == 0
        assert summary["failed"] == 3 and summary["accepted"] == 0
        assert all("HTTP 507" in line and "log_write_failed" in line for line in summary["errors"])
        server.script[:] = []  # the disk has room again: the CLI's exit status says all arrived
        assert main(["--url", server.url, "--token", "token", "--text", "stop the fan", "--label", "HassTurnOff"]) == 0
        assert len(server.log) == 1


def test_gate_reasons_follow_the_settings():
    """The round policy without Ray or a model: each way a candidate is held back, and a pass."""
    from online_learning.round_policy import NO_HOLDOUT, gate_reason

    s = LearnerSettings(max_base_drop=0.02, gate_margin=0.05, gate_min_losses=2)
    assert gate_reason(s, None, 0.9, None, None, 0) == NO_HOLDOUT
    assert gate_reason(s, 0.87, 0.9, None, None, 0).startswith("base accuracy 0.870 < anchor 0.900")
    assert gate_reason(s, 0.89, 0.9, None, None, 0) is None  # within max_base_drop
    assert gate_reason(s, None, 0.9, 0.5, 0.8, 10).startswith("feedback holdout 0.500 < served 0.800")
    assert gate_reason(s, None, 0.9, 0.5, 0.8, 3) is None  # 1 answer lost of 3 is not evidence
    assert gate_reason(s, 0.9, 0.9, 0.78, 0.8, 100) is None  # within the margin


def test_holdout_membership_depends_on_the_secret_and_the_share():
    from online_learning.round_policy import is_holdout

    a = [o for o in range(2000) if is_holdout("salt-a", o, 10)]
    b = [o for o in range(2000) if is_holdout("salt-b", o, 10)]
    assert 120 < len(a) < 280 and a != b  # about a tenth, and not the same tenth under another secret
    assert not any(is_holdout("salt-a", o, 0) for o in range(2000))


def test_version_numbers_jump_other_claims_and_need_ownership(tmp_path):
    """Real store, real lease: numbers go above everything seen, skip a number another publisher
    holds, and a learner that does not own the state_dir reserves nothing."""
    from online_learning.numbering import RESERVE_BLOCK, VersionNumbers
    from online_learning.persistence import NotOwner, Ownership
    from train.store import ModelStore

    store = ModelStore(str(tmp_path / "store"))
    owner, other = Ownership(tmp_path / "state"), Ownership(tmp_path / "state")
    assert owner.try_acquire()
    numbers = VersionNumbers(store, owner, floor=4)
    assert numbers.lineage_first(2, 9) == 10  # above the floor and every number reported
    assert store.reserved() == 10 + RESERVE_BLOCK
    numbers.used(10)
    assert numbers.after(10) == 11 and numbers.after(3) == 11
    with pytest.raises(NotOwner):
        VersionNumbers(store, other, floor=0).lineage_first()
    assert store.reserved() == 10 + RESERVE_BLOCK  # the non-owner wrote no reservation
    owner.release()


def test_a_superseded_learners_late_reservation_cannot_lower_its_successors(tmp_path):
    """The fence is a read before a write: a learner superseded right after its check still
    writes its reservation. It writes under its own epoch's name, so the successor's stays, and
    a fine-tune's next number still goes above the successor's block."""
    from online_learning.numbering import RESERVE_BLOCK, VersionNumbers
    from online_learning.persistence import Ownership
    from train.store import ModelStore

    store = ModelStore(str(tmp_path / "store"))
    store.reserve("online-learner", 3)  # a learner from before epochs
    old = Ownership(tmp_path / "state")
    assert old.try_acquire() and old.epoch == 1
    assert VersionNumbers(store, old).lineage_first() == 4
    old.release()
    new = Ownership(tmp_path / "state")
    assert new.try_acquire() and new.epoch == 2
    successor = VersionNumbers(store, new)
    first = successor.lineage_first()
    assert first == 4 + RESERVE_BLOCK + 1
    assert store.reservations() == {"online-learner-e2": first + RESERVE_BLOCK}  # the older ones it covers: gone
    late = VersionNumbers(store, type("PassedItsCheck", (), {"check": lambda self: None, "epoch": 1})())
    late.free(5)  # its reservation write lands after the successor's
    assert store.reservations()["online-learner-e1"] < store.reserved() == first + RESERVE_BLOCK
    late.free(first + 1)  # a block as high as the successor's: its clean-up must not remove that one
    assert store.reservations()["online-learner-e2"] == first + RESERVE_BLOCK
    save_model_dir(new_model("small", ["A", "B"]), tmp_path / "ft")
    assert store.publish(tmp_path / "ft") == store.reserved() + 1 > first + RESERVE_BLOCK  # a fine-tune: above all
    new.release()


def test_plan_update_picks_the_cheapest_update_a_replica_can_apply():
    from online_learning.protocol import ReplicaIdentity
    from online_learning.replicas import Published, plan_update

    pub = Published("L", 7, "d7", 70, chain_base=4, published_at=0.0, base=1, deltas={5: "r5", 6: "r6", 7: "r7"})
    held = lambda lineage, version, digest: ReplicaIdentity(lineage, version, digest, 0)
    assert plan_update(held("L", 7, "d7"), None) == ("wait", [])
    assert plan_update(held("L", 7, "d7"), pub) == ("none", [])
    assert plan_update(held("other", 3, "d7"), pub) == ("relabel", [])  # same weights, another name
    assert plan_update(held("L", 5, "d5"), pub) == ("deltas", [6, 7])
    assert plan_update(held("L", 4, "d4"), pub) == ("deltas", [5, 6, 7])
    assert plan_update(held("L", 3, "d3"), pub) == ("full", [])  # below the lineage's first version
    assert plan_update(held("other", 6, "d6"), pub) == ("full", [])  # another lineage's 6 is other weights
    assert plan_update(held("L", 5, "d5"), Published("L", 7, "d7", 70, 4, 0.0, 1, {7: "r7"})) == ("full", [])
    assert plan_update(ReplicaIdentity(None, -1, None, -1), pub) == ("full", [])  # a replica holding nothing yet


def test_replica_reports_track_the_oldest_event_a_live_replica_lacks():
    from online_learning.protocol import ReplicaIdentity
    from online_learning.replicas import REPLICA_FORGET_S, REPLICA_LIVE_S, ReplicaReports

    reports = ReplicaReports()
    reports.acknowledged([5, 6, 7], now=100.0)
    reports.acknowledged_before(range(2, 5), when=90.0)  # found in the log at start, before those
    assert [o for o, _ in reports.acked] == [2, 3, 4, 5, 6, 7]
    reports.report("a", ReplicaIdentity("L", 3, "d", 4), now=101.0)
    reports.report("b", ReplicaIdentity("L", 9, "d", 6), now=101.0)
    reports.prune(served_offset=7, now=102.0)
    assert reports.oldest_unserved() == 100.0 and reports.max_reported == 9  # "a" lacks 5..7
    reports.prune(served_offset=7, now=101.0 + REPLICA_LIVE_S)  # both silent: no longer live
    assert reports.oldest_unserved() is None
    reports.report("c", ReplicaIdentity("L", 1, "d", 7), now=101.0 + REPLICA_FORGET_S + 1)
    assert set(reports.replicas) == {"c"} and reports.max_reported == 9  # forgotten, the number not
    reports.acknowledged([8], now=101.0 + REPLICA_FORGET_S + 2)
    reports.report("d", ReplicaIdentity("L", 9, "d", 8), now=101.0 + REPLICA_FORGET_S + 2)
    reports.prune(served_offset=8, now=101.0 + REPLICA_FORGET_S + 3)
    assert reports.oldest_unserved() is not None  # "c" (live, at offset 7) lacks event 8
    reports.forget("c", now=101.0 + REPLICA_FORGET_S + 3)  # Serve stopped it (a rollout): it said goodbye
    reports.report("c", ReplicaIdentity("L", 1, "d", 7), now=101.0 + REPLICA_FORGET_S + 3)  # a poll in flight
    reports.prune(served_offset=8, now=101.0 + REPLICA_FORGET_S + 3)
    assert reports.oldest_unserved() is None and set(reports.replicas) == {"d"}


def test_followups_are_owed_by_rounds_that_learned_and_paid_by_follow_up_rounds():
    from online_learning.round_policy import Followups, owed_followups

    s = LearnerSettings()
    f = Followups(s)
    f.after_round(True, 40, replaying=False)
    owed = owed_followups(s, 0, 40)
    assert f.left == owed > 0 and f.burst_events == 40
    f.after_round(True, 0, replaying=False)  # a round that kept nothing owes nothing more
    assert f.left == owed
    paid = 0
    while f.left:
        f.after_round(False, 0, replaying=False)
        paid += 1
    assert paid == math.ceil(owed) and f.burst_events == 0  # the burst is over once they are paid


def test_a_failed_reservation_write_reserves_nothing_and_the_retry_jumps_a_claim_made_meanwhile(tmp_path):
    """Row b: the learner's numbers run past its reserved block and the next reservation PUT
    fails (a transient S3 error). It must not believe the block reserved: a fine-tune that takes
    the next number meanwhile, then the learner's retry, give two different numbers."""
    from online_learning.numbering import RESERVE_BLOCK, VersionNumbers
    from train.store import ModelStore

    class ReserveFails(ModelStore):
        fail = False

        def reserve(self, owner, up_to):
            if self.fail:
                self.fail = False
                raise OSError("PUT _reserved/... failed (transient)")
            super().reserve(owner, up_to)

    store = ReserveFails(str(tmp_path / "store"))
    numbers = VersionNumbers(store, type("Owner", (), {"check": lambda self: None, "epoch": 1})())
    first = numbers.lineage_first()
    last = first + RESERVE_BLOCK  # the block's last number, used without a store call
    assert numbers.after(last - 1) == last and store.reserved() == last
    numbers.used(last)
    store.fail = True
    with pytest.raises(OSError, match="transient"):
        numbers.after(last)
    assert store.reserved() == last
    save_model_dir(new_model("small", ["A", "B"]), tmp_path / "ft")
    fine_tune = store.publish(tmp_path / "ft")
    assert fine_tune == last + 1  # above every reservation
    assert numbers.after(last) == last + 2  # jumps the fine-tune's number, never hands it out again
