"""Adopting a base is all or nothing: the real learner's `_adopt` on a real model store and feedback
log, where the store's listing fails once. No Ray: the learner object is made without its
constructor (which would start the training thread and, on publish, Ray); `_adopt` reads only the
settings, the store, the log and the judged offset."""

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

    def versions(self):
        if self.fail_next:
            self.fail_next = False
            raise OSError("listing the store failed (transient)")
        return super().versions()


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
