"""A step of the wall clock (NTP, a resumed VM) changes no interval the learner measures: replica
liveness and staleness run on the monotonic clock. The clock step is real to the code: time.time
itself jumps. No Ray."""

from __future__ import annotations

import time

import pytest

from online_learning.protocol import ReplicaIdentity
from online_learning.replicas import REPLICA_LIVE_S, ReplicaReports


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_a_wall_clock_step_neither_fails_live_replicas_nor_hides_staleness(monkeypatch, step_s):
    reports = ReplicaReports()  # as the learner makes it
    reports.report("r1", ReplicaIdentity("L", 3, "d3", 4))
    reports.acknowledged([5, 6])  # acknowledged now; r1 serves up to 4
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + step_s)  # the wall clock jumps by an hour
    assert list(reports.live()) == ["r1"]  # a forward step would make r1 look an hour silent
    assert 0 <= reports.staleness_s() < REPLICA_LIVE_S  # a backward step would make it negative
    reports.prune(served_offset=4)
    assert [o for o, _ in reports.acked] == [5, 6]  # still owed to r1
    reports.report("r1", ReplicaIdentity("L", 4, "d4", 6))
    assert abs(reports.replicas["r1"].reported_at - (wall + step_s)) < 60  # shown as wall time
    reports.prune(served_offset=6)
    assert reports.staleness_s() == 0.0
