"""The learner's `status` (GET /v1/model shows it under "learner", `python -m online_learning
status` renders it): what it serves and replays towards, its offsets and counts, the replicas it
heard from, its last rounds, outcome counters and the log's figures (online_learning/protocol.py:
LearnerStatus, or StandbyStatus while it has nothing of its own to report).

`StatusReport` is a part of the OnlineLearner deployment (online_learning/learner.py): `status`
runs on its event loop and only reads.
"""

from __future__ import annotations

import math
import os

from online_learning.protocol import LearnerStatus, StandbyStatus


class StatusReport:
    async def status(self) -> LearnerStatus | StandbyStatus:
        if not self._ready:  # a standby, or an owner still adopting its base: nothing of its own to report yet
            owning = self._log_open and not self._fenced
            return StandbyStatus(owner=owning, standby=not self._log_open, epoch=self._owner.epoch if owning else 0,
                                 owner_epoch=self._owner.current_epoch(), pid=os.getpid(),
                                 publish_interval_s=self.s.publish_interval_s, max_staleness_s=self.s.max_staleness_s)
        pub = self.pub
        self.reports.prune(pub.log_offset if pub else -1)
        return LearnerStatus(
            lineage=pub.lineage if pub else None, version=pub.version if pub else None,
            digest=pub.digest if pub else None, published_at=pub.published_at if pub else None,
            replaying=self.replaying, next_lineage=self.lineage if self.replaying else None,
            base_version=pub.base if pub else None, next_base_version=self.base_version if self.replaying else None,
            ready_offset=self.ready_offset, judged_offset=self._judged_offset,
            compacted_unlearned=self.compacted_unlearned,
            applied_offset=self.applied_offset, served_offset=pub.log_offset if pub else None,
            log_length=len(self.log), replayed_on_start=self.replayed,
            pending=max(0, len(self.log) - 1 - self.applied_offset), held_back=self.held_back,
            refused=self.refused, followups_left=math.ceil(self.followups.left),
            pid=os.getpid(), staleness_s=self.reports.staleness_s(),
            owner=self._fenced is None, standby=False, epoch=self._owner.epoch, fenced=self._fenced,
            publish_interval_s=self.s.publish_interval_s, max_staleness_s=self.s.max_staleness_s,
            replicas=self.reports.live(), history=list(self.history)[-50:],
            feedback_outcomes=self._metrics.counts(), log=self.log.stats())
