"""Lineages on a real model store and feedback log, where something fails: adopting a base is all
or nothing when the store's listing fails; a fine-tune committed below a learner snapshot's number
is still adopted; a failed state write before a lineage's first publish is retried whole. No Ray:
the learner object is made without its constructor (which would start the training thread and,
on publish, Ray), with the few fields the tested methods read."""

from __future__ import annotations

import pytest

from online_learning.feedback_log import FeedbackEvent, FeedbackLog
from online_learning.learner import OnlineLearner
from online_learning.settings import LearnerSettings
from train.model import new_model, save_model_dir
from train.store import ModelStore


class ListingFailsOnce(ModelStore):
    """A real store whose next listing fails (a transient S3/NFS error), once."""

    fail_next = False

    def numbers(self):
        if self.fail_next:
            self.fail_next = False
            raise OSError("listing the store failed (transient)")
        return super().numbers()


def test_a_listing_error_while_adopting_leaves_the_current_lineage_whole(tmp_path):
    store = ListingFailsOnce(str(tmp_path / "store"))
    for k in range(2):
        save_model_dir(new_model("small", ["A", "B"]), tmp_path / f"m{k}")
        assert store.publish(tmp_path / f"m{k}") == k + 1
    log = FeedbackLog(tmp_path / "state")
    log.append([FeedbackEvent(f"id-{i}", f"text {i}", "A") for i in range(5)])
    cls = OnlineLearner.func_or_class
    learner = cls.__new__(cls)
    learner.s, learner.store, learner.log = LearnerSettings(state_dir=str(tmp_path / "state")), store, log
    learner._base_data_spec, learner._judged_offset = None, 4
    learner._adopt(1, "start")
    fields = ("trainer", "_next_mirror", "lineage", "base_version", "applied_offset", "ready_offset",
              "_store_seen", "replaying", "followups", "contradiction", "feedback_train")
    learner.replaying = False  # as once the lineage was published
    learner.applied_offset = 4
    before = {f: getattr(learner, f) for f in fields}

    store.fail_next = True
    with pytest.raises(OSError, match="transient"):
        learner._adopt(2, "adopting a retrained model v2")
    assert {f: getattr(learner, f) for f in fields} == before  # not one field of the new base

    learner._adopt(2, "adopting a retrained model v2")  # the next check adopts it whole
    assert learner.base_version == 2 and learner.replaying and learner.lineage != before["lineage"]
    assert learner.trainer is not before["trainer"] and learner._store_seen == 2
    log.close()


class CommitWaits(ModelStore):
    """A real store whose publish uploads its files, then waits for `commit` before writing the
    commit marker: a fine-tune of the large model whose upload takes minutes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import threading

        self.uploaded, self.commit = threading.Event(), threading.Event()

    def _write_marker(self, version, data):
        self.uploaded.set()
        assert self.commit.wait(60), "the test never let the upload commit"
        super()._write_marker(version, data)


def _saved(tmp_path, name: str, **metrics):
    model = new_model("small", ["A", "B"])
    model.metrics = metrics
    return save_model_dir(model, tmp_path / name)


def _learner_on(store: ModelStore, tmp_path):
    """A learner object (no constructor: no thread, no Ray) on `store` with a base v1 published
    and five events in its log, judged; and the log."""
    assert store.publish(_saved(tmp_path, "base", kind="trained")) == 1
    log = FeedbackLog(tmp_path / "state")
    log.append([FeedbackEvent(f"id-{i}", f"text {i}", "A") for i in range(5)])
    cls = OnlineLearner.func_or_class
    learner = cls.__new__(cls)
    learner.s, learner.store, learner.log = LearnerSettings(state_dir=str(tmp_path / "state")), store, log
    learner._base_data_spec, learner._judged_offset, learner.pub, learner.history = None, 4, None, []
    return learner, log


def test_a_fine_tune_committed_below_a_learner_snapshot_is_adopted_now_and_after_a_restart(tmp_path):
    """Row a: a fine-tune claims v2 and uploads slowly; meanwhile the learner reserves its block
    and stores a snapshot above it (v3, as the number was taken). When the fine-tune commits v2,
    the learner's next look adopts it although 2 < 3; and a learner restarted from the state
    file (before that look) starts from v2, not from its own older snapshot."""
    import threading

    from online_learning.numbering import VersionNumbers
    from train.learner_state import LearnerState

    root = str(tmp_path / "store")
    store = ModelStore(root)
    learner, log = _learner_on(store, tmp_path)
    cls = OnlineLearner.func_or_class
    version, listing = learner._start_version()
    learner._adopt(version, "start", listing)
    assert learner.base_version == 1

    fine_tune = CommitWaits(root)
    published: list[int] = []
    upload = threading.Thread(target=lambda: published.append(
        fine_tune.publish(_saved(tmp_path, "ft", kind="fine-tune", log_offset=2))))
    upload.start()
    try:
        assert fine_tune.uploaded.wait(60)  # v2 claimed and uploaded, not committed
        numbers = VersionNumbers(store, owner=type("Owner", (), {"check": lambda self: None, "epoch": 1})())
        snapshot = numbers.lineage_first(learner._store_seen)  # reserves a block, jumps the claim
        assert snapshot == 3
        assert store.publish(_saved(tmp_path, "snap", kind="online-snapshot", log_offset=4), version=snapshot) == 3
        learner._used_number(snapshot)  # what a stored snapshot records
        learner._maybe_rebase()  # v2 still uploading: nothing to adopt, and not forgotten
        assert learner.base_version == 1 and 2 in learner._store_pending
        state = LearnerState(store_seen=learner._store_seen, store_pending=tuple(sorted(learner._store_pending)))
    finally:
        fine_tune.commit.set()
        upload.join(60)
    assert published == [2] and store.versions() == [1, 2, 3]

    from train.learner_state import read_state, write_state_file

    write_state_file(tmp_path / "state", state)  # what the learner's next state write keeps
    state = read_state(tmp_path / "state")
    assert (state.store_seen, state.store_pending) == (3, (2,))
    restarted = cls.__new__(cls)
    restarted.s, restarted.store, restarted.log = learner.s, store, log
    assert restarted._start_version(state)[0] == 2  # not v3, the snapshot without the fine-tune
    assert restarted._start_version()[0] == 3  # what a learner that keeps no store_seen would pick

    learner._maybe_rebase()
    assert learner.base_version == 2 and learner.applied_offset == 2 and learner.replaying
    assert learner.history[-1]["rebased_on"] == 2
    assert learner._store_pending == frozenset() and learner._store_seen == 3
    learner._maybe_rebase()  # looked at: not adopted twice
    assert len(learner.history) == 1
    # Restarted before the new lineage stored a snapshot: the state file names the lineage and
    # its base (v2), so the restart resumes it rather than the older lineage's snapshot v3.
    state = LearnerState(lineage=learner.lineage, base_version=learner.base_version,
                         store_seen=learner._store_seen, store_pending=tuple(learner._store_pending))
    assert restarted._start_version(state)[0] == 2
    assert store.publish(_saved(tmp_path, "snap2", kind="online-snapshot", log_offset=4,
                                lineage=learner.lineage), version=numbers.after(snapshot)) == 4
    assert restarted._start_version(state)[0] == 4  # once it has one, its own newest snapshot
    log.close()
    # What the learner's own state write keeps (the state file above was built by hand): the
    # lineage, its base and what it has seen of the store, read back by a restart.
    from online_learning.persistence import Ownership, StateFile
    from train.learner_state import read_state as read_back

    owner = Ownership(tmp_path / "state")
    assert owner.try_acquire()
    learner._state, learner._owner, learner._salt, learner.numbers = StateFile(owner), owner, "s", numbers
    learner._used_number(9)  # a snapshot stored as v9: 4..8 (v4 unlooked at) pending until the next look
    learner._write_state(9)
    written = read_back(tmp_path / "state")
    assert (written.lineage, written.base_version, written.store_seen) == (learner.lineage, 2, 9)
    assert written.store_pending == (4, 5, 6, 7, 8)
    owner.release()


def test_a_failed_state_write_while_publishing_a_lineage_is_retried_whole(tmp_path):
    """Row h: the state write before a lineage's first publish fails (a full disk, a lost lease
    is another test). Nothing is published, and the next round's retry publishes the lineage
    (it used to find the next mirror already dropped and fail with AttributeError forever)."""
    import threading
    from collections import deque

    from online_learning.numbering import VersionNumbers
    from online_learning.replicas import ReplicaReports

    store = ModelStore(str(tmp_path / "store"))
    assert store.publish(_saved(tmp_path, "base", kind="trained")) == 1
    log = FeedbackLog(tmp_path / "state")
    cls = OnlineLearner.func_or_class
    learner = cls.__new__(cls)
    learner.s, learner.store, learner.log = LearnerSettings(state_dir=str(tmp_path / "state")), store, log
    learner._base_data_spec, learner._judged_offset, learner.pub = None, -1, None
    learner._adopt(1, "start")
    learner.numbers = VersionNumbers(store, type("Owner", (), {"check": lambda self: None, "epoch": 1})())
    learner.reports, learner.history, learner._model_lock = ReplicaReports(), deque(), threading.Lock()
    learner._owner = type("Owner", (), {"epoch": 1})()
    learner._metrics = type("Metrics", (), {"published": lambda self, *a: None})()
    written = []

    def write_state(version):
        if not written:
            written.append(None)
            raise OSError(28, "No space left on device")
        written.append(version)
    learner._write_state = write_state

    with pytest.raises(OSError, match="No space"):
        learner._publish_lineage()
    assert learner.pub is None and learner.replaying and learner._next_mirror is not None
    learner._publish_lineage()  # the next round's retry
    assert learner.pub is not None and learner.pub.version == written[-1] and not learner.replaying
    assert learner.served.version == learner.pub.version and learner._next_mirror is None
    log.close()


class PublishesDuringLoad(ModelStore):
    """A real store where another publisher commits `other` while the learner loads a version
    (a fine-tune finishing during an adoption)."""

    other = None

    def load(self, version=None):
        if self.other is not None:
            other, self.other = self.other, None
            ModelStore(self.uri).publish(other)
        return super().load(version)


def test_a_fine_tune_committed_while_the_learner_adopts_another_is_adopted_next(tmp_path):
    """Between the listing that chose a version to adopt and the adoption's end, another fine-tune
    commits above every number listed. The next look adopts it (the learner must not take the
    adoption's own, later view of the store as looked at)."""
    store = PublishesDuringLoad(str(tmp_path / "store"))
    learner, log = _learner_on(store, tmp_path)
    version, listing = learner._start_version()
    learner._adopt(version, "start", listing)
    assert store.publish(_saved(tmp_path, "ft1", kind="fine-tune", log_offset=1)) == 2
    store.other = _saved(tmp_path, "ft2", kind="fine-tune", log_offset=3)  # commits as v3 while v2 loads
    learner._maybe_rebase()
    assert learner.base_version == 2 and store.versions() == [1, 2, 3]
    learner._maybe_rebase()
    assert learner.base_version == 3 and learner.applied_offset == 3
    log.close()
