"""The OnlineLearner deployment: one per application; Serve restarts it when its process dies.

Feedback is appended to the durable log before it is acknowledged. A background thread trains
the learner's own copy in rounds (at most one per `publish_interval_s`), gates each candidate,
and publishes passing versions as deltas in Ray's object store. Replicas pull what they are
missing (`updates_since`).

Ownership: one learner owns a state_dir at a time (persistence.py). A learner that finds it owned
(a replacement replica started before the old one stopped, a second cluster during an upgrade)
starts as a standby: it answers `submit` with `not_owner` and replicas with "wait" until the
lease is free, then opens the log, adopts, replays and publishes. Every write checks the owner's
epoch first, and every update and `learner` answer carries it (`epoch`), so a replica can ignore
an owner that was superseded.

Identity: weights are named (lineage, version) and carry a digest of their values. A learner
start, and the adoption of a model someone else published to the store (a fine-tune or a plain
retrain), begin a new lineage whose first version is above every number the store, the state
file and any replica has shown. Deltas go only to replicas on the current lineage; a replica
elsewhere gets full weights, or only the new name when its digest already equals the learner's.
A new lineage is published only once the log after its base has been replayed up to the offset
the learner had judged through (`ready_offset`), so a replica never takes a version that lacks
feedback judged before it; events acknowledged but not judged before a restart are then judged as
new feedback (the contradiction check, the gate), never replayed unchecked.

This module is the deployment itself: construction and ownership, the Serve API (`admit`,
`submit`, `updates_since`; `status` in status_report.py), the training thread's loop and the
health check. The learner's state is one object because it must change together (the learner's
copy, the served mirror, the lineage, the offsets), written by one training thread and read by the
event loop under one lock; its behaviour is split by job into parts the class is built from:
adopting bases and replaying (lineages.py), rounds (rounds.py), publishing and snapshots
(publishing.py), the status report (status_report.py). Elsewhere: the round policy
(round_policy.py), version numbering (numbering.py), ownership and the state file
(persistence.py), what replicas hold and need (replicas.py), the messages exchanged with them
(protocol.py), the log (feedback_log.py).
"""

import asyncio
import logging
import os
import secrets
import threading
import time
from collections import deque

from ray import serve

from online_learning.feedback_log import EventIdConflict, FeedbackLog
from online_learning.lineages import Lineages
from online_learning.metrics import LearnerMetrics
from online_learning.numbering import VersionNumbers
from online_learning.persistence import NotOwner, Ownership, StateFile
from online_learning.protocol import (Accepted, Conflict, FeedbackEvent, LearnerInfo, NotOwnerAnswer, ReplicaIdentity,
                                      SubmitAnswer, UpdatesAnswer, WriteFailed)
from online_learning.publishing import Publishing
from online_learning.rate_limit import FeedbackLimiter
from online_learning.replicas import Published, ReplicaReports, plan_update
from online_learning.rounds import Rounds
from online_learning.settings import LearnerSettings
from online_learning.status_report import StatusReport
from train.log_format import LogWriteError

logger = logging.getLogger("ray.serve")
OWNER_RETRY_S = 0.2  # how often a standby tries to take the state_dir's lease
STORE_CHECK_S = 2.0  # how often the training thread looks for a new base in the model store


def _lower_priority(nice: int, spare: set[int] = frozenset()) -> None:
    """Raise the nice value of every thread of this process but `spare` (and so of the threads
    they start): on a machine it shares with replicas, training (the learner's thread and
    TensorFlow's pools) yields the CPU to serving, while the event loop that acknowledges
    feedback and answers replicas keeps its priority. Linux nice is per thread, hence each task;
    lowering priority needs no privilege."""
    if nice <= 0 or not os.path.isdir("/proc/self/task"):
        return
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in spare:
            continue
        try:
            current = os.getpriority(os.PRIO_PROCESS, int(tid))
            os.setpriority(os.PRIO_PROCESS, int(tid), max(current, min(19, nice)))
        except OSError:  # a thread that ended meanwhile
            continue


# A deploy that replaces the learner starts the new one first (max_surge_percent): it stands by
# until the old one, stopping, hands the log over; a short drain loop keeps that handover quick.
@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=2, health_check_timeout_s=10, max_surge_percent=100,
                  graceful_shutdown_wait_loop_s=0.2)
class OnlineLearner(Lineages, Rounds, Publishing, StatusReport):
    def __init__(self, model_store: str, settings: dict, tf_threads: int = 1):
        self.s = LearnerSettings(**settings)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
        from train.store import ModelStore

        self.store = ModelStore(model_store)
        self._owner = Ownership(self.s.state_dir)
        self._state = StateFile(self._owner)
        self._log_open = False  # True once this learner owns the state_dir and has opened the log
        self._ready = False  # ...and has adopted a base
        self._fenced: str | None = None  # why this learner lost ownership (it then writes nothing)
        self._failed_rounds = 0
        self._warned_gap: tuple[int, int] | None = None
        self.compacted_unlearned = 0  # events a lineage's base lacked and compaction had deleted
        self._loop_threads: set[int] = set()  # the event loop's thread, kept at normal priority
        self._model_lock = threading.Lock()  # the served mirror: publish (thread) vs full builds (executor)
        self.pub: Published | None = None  # None until the first lineage is published (after replay)
        self._full: tuple[int, asyncio.Future] | None = None
        self.reports = ReplicaReports()  # what replicas hold, and acknowledged events not on all of them
        self.history: deque = deque(maxlen=200)
        self.held_back = 0
        self.replayed = 0
        self.refused = 0  # events refused by the contradiction check
        self._metrics = LearnerMetrics()
        self._rest_until = 0.0  # the duty cycle's rest after the last round (monotonic)
        self._limiter = FeedbackLimiter(self.s.rate_limit_per_s, self.s.rate_burst, self.s.auth_fail_rate_per_s,
                                        self.s.auth_fail_burst, self.s.rate_limit_clients)
        self._base_data_spec = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        if self._owner.try_acquire():
            self._take_over()  # as before ownership existed: a failure to start shows in the constructor
            target = self._run
        else:
            logger.warning("%s is owned by another learner (epoch %s): standing by until it is free",
                           self.s.state_dir, self._owner.current_epoch())
            target = self._stand_by
        self._thread = threading.Thread(target=target, name="learner", daemon=True)
        self._thread.start()

    # -- ownership -------------------------------------------------------------------------
    def _take_over(self) -> None:
        """Now the owner: open the log, read the state file, adopt a base (replayed before it is
        published). `submit` appends as soon as the log is open (a handover keeps feedback out
        only while the log opens, not while a model loads); replicas wait until this has run."""
        try:
            self.log = FeedbackLog(self.s.state_dir, segment_events=self.s.log_segment_events,
                                   retain_events=self.s.log_retain_events, owner=self._owner)
            opened_at = len(self.log)
            self._log_open = True
            state = self._state.read()
            # Holdout membership is drawn from the learner's own secret and the offset it assigned,
            # so a client cannot choose which of its events are held out.
            self._salt = state.holdout_salt or secrets.token_hex(8)
            self.numbers = VersionNumbers(self.store, self._owner, floor=state.version)
            # Events up to here were judged (the feedback check, the gate) by a round that published or
            # marked them; later ones were acknowledged but not judged before a restart, and are judged
            # as new events once the lineage is published, never replayed into it unchecked.
            self._judged_offset = state.judged_offset
            version, listing = self._start_version(state)
            self._adopt(version, listing=listing, reason=f"start (ownership epoch {self._owner.epoch})")
            # Before the events submitted while adopting, already recorded.
            self.reports.acknowledged_before(range(self.applied_offset + 1, opened_at))
        except BaseException:
            self._owner.release()  # another learner may do better: do not keep the lease while failing
            if getattr(self, "log", None) is not None:
                self.log.close()
            self._log_open, self.log = False, None  # closed once: its fd numbers may be reused by now
            raise
        self._ready = True

    def _stand_by(self) -> None:
        """A standby's thread: wait for the lease, take over, then learn."""
        if not self._owner.acquire(self._stop, OWNER_RETRY_S):
            return
        logger.warning("took ownership of %s (epoch %s)", self.s.state_dir, self._owner.epoch)
        self._take_over()
        self._run()

    def _not_owner(self) -> NotOwnerAnswer:
        epoch = self._owner.current_epoch()
        why = self._fenced or f"another learner owns {self.s.state_dir} (epoch {epoch}); this one is standing by"
        return NotOwnerAnswer(epoch, why)

    def _lost_ownership(self, err: NotOwner) -> None:
        if self._fenced is None:
            logger.error("%s", err)
        self._fenced = str(err)
        self._stop.set()  # the training thread ends; the health check then asks Serve for a new replica

    # -- feedback --------------------------------------------------------------------------
    async def admit(self, client: str, auth_ok: bool) -> int:
        """One app-wide rate budget per client (every replica asks here): 0, or Retry-After seconds."""
        self._loop_threads.add(threading.get_native_id())
        return self._limiter.admit(client, auth_ok)

    async def submit(self, events: list[FeedbackEvent]) -> SubmitAnswer:
        reply = await self._submit(events)
        self._metrics.submitted(reply)
        return reply

    async def _submit(self, events: list[FeedbackEvent]) -> SubmitAnswer:
        """Append to the durable log (fsync); the training thread reads new events from the log.

        Accepted, or Conflict when an id already names another event (then nothing of the batch
        was written), or NotOwnerAnswer when this learner does not own the log (a standby, or one
        that was superseded): nothing written, the caller retries (another replica may own it)."""
        if not self._log_open or self._fenced:
            return self._not_owner()
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self.log.append, list(events))
        except NotOwner as err:  # nothing written: the owner now is another learner
            self._lost_ownership(err)
            return self._not_owner()
        except EventIdConflict as err:
            return Conflict(err.event_id, err.offset)
        except LogWriteError as err:  # nothing written, nothing acknowledged; the log is as before
            logger.error("feedback log write failed: %s", err)
            return WriteFailed(err.errno_name, str(err))
        self.reports.acknowledged([off for off, dup in results if not dup])  # its own monotonic clock
        self._wake.set()
        return Accepted(tuple((off, dup) for off, dup in results))

    # -- the training thread ---------------------------------------------------------------
    def _run(self) -> None:
        last_round, last_store_check, last_nice = 0.0, 0.0, 0.0
        while not self._stop.is_set():
            if not self.replaying:
                self._wake.wait(timeout=self.s.publish_interval_s)
                self._wake.clear()
                wait = max(self.s.publish_interval_s - (time.monotonic() - last_round), self._rest_until - time.monotonic())
                if wait > 0 and self._stop.wait(wait):
                    return
            if time.monotonic() - last_nice >= 10:  # again now and then: TensorFlow starts threads lazily
                last_nice = time.monotonic()
                _lower_priority(self.s.nice, spare=self._loop_threads)
            try:
                if time.monotonic() - last_store_check >= STORE_CHECK_S:
                    last_store_check = time.monotonic()
                    self._maybe_rebase()
                self._metrics.log_state(self.log.stats(), self._judged_offset)
                batch = self._next_batch()  # new events; none but follow-ups owed: replay what just arrived
                if not batch and not self.followups.left:
                    if self.replaying:
                        # Caught up with everything acknowledged before; live replicas have reported
                        # their versions (the new one goes above them).
                        if time.monotonic() - self._adopted_at < 3 * self.s.replica_poll_s:
                            self._stop.wait(self.s.replica_poll_s)
                            continue
                        self._publish_lineage()
                        continue
                    self._maybe_snapshot()
                    continue
                last_round = time.monotonic()
                kept = self._round_or_roll_back(batch)
                # After the round: a failed one is retried, not counted twice.
                self.followups.after_round(bool(batch), kept, self.replaying)
                self._maybe_snapshot()
                self._failed_rounds = 0
                self._metrics.round_failed(0)
                # The duty cycle: after a round of t seconds, rest t * (1 - d) / d, so training
                # takes at most a share d of the time (the CPU it leaves goes to serving).
                took, duty = time.monotonic() - last_round, self.s.train_duty_cycle
                self._rest_until = time.monotonic() + took * (1 - duty) / duty
                if self.history:  # the entry `_round` just appended
                    self.history[-1]["round_s"] = round(took, 3)
                    self._metrics.round_done(self.history[-1], took)
            except NotOwner as err:  # superseded: not one more write; Serve replaces this replica
                self._lost_ownership(err)
                return
            except Exception:  # a failed round must not end learning: log it, retry next round
                self._failed_rounds += 1
                self._metrics.round_failed(self._failed_rounds)
                logger.exception("learner round failed (%s in a row)", self._failed_rounds)
                if self._stop.wait(self.s.publish_interval_s):
                    return

    # -- replicas --------------------------------------------------------------------------
    async def updates_since(self, replica: str, identity: ReplicaIdentity) -> UpdatesAnswer:
        """What a replica holding `identity` needs:
        wait (no lineage published yet, or this learner is a standby), none, relabel (same
        digest), deltas, or full weights. `learner` carries `epoch`, the ownership epoch of the
        learner answering (0 for a standby, which owns nothing), as does every update: a
        replica ignores updates from an epoch below the highest it has seen.
        Never blocks the event loop: full weights are built once per version in a thread."""
        self._loop_threads.add(threading.get_native_id())  # spared by _lower_priority
        self.reports.report(replica, identity)
        self._metrics.replica_report(replica, identity.log_offset, self.reports.acked, self.reports.clock())
        # a standby too: its first number goes above them all
        if not self._ready:  # a standby (epoch 0: it owns nothing), or an owner still adopting its base
            owning = self._log_open and not self._fenced
            return UpdatesAnswer("wait", LearnerInfo(epoch=self._owner.epoch if owning else 0, owner=owning))
        pub = self.pub
        self.reports.prune(pub.log_offset if pub else -1)
        info = LearnerInfo(epoch=self._owner.epoch, owner=self._fenced is None,
                           identity=pub.identity() if pub else None, ready_offset=self.ready_offset,
                           published_at=pub.published_at if pub else None, base_version=pub.base if pub else None)
        kind, versions = plan_update(identity, pub)
        if kind == "deltas":
            return UpdatesAnswer(kind, info, tuple(pub.deltas[v] for v in versions))
        if kind == "full":
            return UpdatesAnswer(kind, info, (await self._full_ref(),))
        return UpdatesAnswer(kind, info)

    async def goodbye(self, replica: str) -> None:
        """A replica Serve is stopping (a rollout, a downscale): stop counting it as live. On the
        event loop, like `updates_since`, which reads the same reports."""
        self.reports.forget(replica)

    async def check_health(self) -> None:
        if self._fenced:  # superseded: a new replica starts as a standby (or owner) instead
            raise RuntimeError(self._fenced)
        if not self._thread.is_alive():
            raise RuntimeError("the learner's training thread stopped")
        if self._failed_rounds >= 10:  # stuck (a store it cannot read, a log it cannot write): restart
            raise RuntimeError(f"{self._failed_rounds} learner rounds in a row failed; see the log")

    def __del__(self):
        """Serve stopping this replica: end the training thread, then hand the lease over at once
        (a standby takes it within OWNER_RETRY_S) rather than when the process exits."""
        if not hasattr(self, "_thread"):  # not when __init__ failed before it
            return
        self._stop.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a round still writing keeps the lease until the process ends
            if self._log_open:
                self.log.close()
            self._owner.release()
