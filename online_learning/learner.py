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

What lives elsewhere: the round policy (round_policy.py), version numbering (numbering.py),
ownership and the state file (persistence.py), the replica side (replicas.py), the log
(feedback_log.py). This module is longer than the others for a reason: what is left is the
state that must change together (the learner's copy, the served mirror, the lineage, the
offsets), written by one training thread and read by the event loop under one lock.
"""

import asyncio
import logging
import math
import os
import random
import secrets
import tempfile
import threading
import time
import uuid
from collections import deque

import ray
from ray import serve

from online_learning.contradiction import ContradictionCheck
from online_learning.metrics import LearnerMetrics
from online_learning.feedback_log import EventIdConflict, FeedbackEvent, FeedbackLog, LoggedEvent
from online_learning.numbering import VersionNumbers
from online_learning.persistence import NotOwner, Ownership, StateFile
from online_learning.rate_limit import FeedbackLimiter
from online_learning.replicas import Published, ReplicaReports, plan_update
from online_learning.round_policy import NO_HOLDOUT, Followups, gate_reason, is_holdout, lineage_anchor, next_batch
from online_learning.settings import LearnerSettings
from train.learner_state import LearnerState
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
class OnlineLearner:
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
            self._adopt(self._start_version(), reason=f"start (ownership epoch {self._owner.epoch})")
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

    def _not_owner(self) -> dict:
        epoch = self._owner.current_epoch()
        why = self._fenced or f"another learner owns {self.s.state_dir} (epoch {epoch}); this one is standing by"
        return {"not_owner": {"epoch": epoch, "message": why}}

    def _lost_ownership(self, err: NotOwner) -> None:
        if self._fenced is None:
            logger.error("%s", err)
        self._fenced = str(err)
        self._stop.set()  # the training thread ends; the health check then asks Serve for a new replica

    # -- lineages --------------------------------------------------------------------------
    def _start_version(self) -> int:
        """The newest store version whose later feedback the log still holds (else the newest)."""
        versions = self.store.versions()
        if not versions:
            raise FileNotFoundError(f"no model in {self.store.shown}; train one first: python -m train --size small")
        for v in reversed(versions):
            if self._adoptable(self.store.metrics(v)):
                return v
            logger.error("not starting from v%s: the log after its offset was compacted", v)
        return versions[-1]

    def _adopt(self, store_version: int, reason: str) -> None:
        """Start a new lineage on a store version: load it, replay the log after its offset,
        publish once caught up (see `_run`). Called at start and by the training thread.

        All or nothing: everything that can fail (loading, base data, the store listing) runs
        before the first field changes, so a failure leaves the current lineage as it was (a
        half-adopted learner would publish old served weights with the new base's name)."""
        from online_learning.trainer import OnlineTrainer

        loaded, mirror = self.store.load(store_version), self.store.load(store_version)
        metrics = loaded.metrics
        base_data = None
        if self._base_data_spec is None or metrics.get("data"):
            base_data = self._load_base_data(metrics.get("data"))
        offset = metrics.get("log_offset", -1)
        trainer = OnlineTrainer(loaded, self.s.learning_rate, self.s.dense_learning_rate)
        store_seen = max(self.store.versions() or [0])
        # The lineage's first version holds every event judged so far (replayed); events acknowledged
        # but not judged yet are judged as new feedback once it is published.
        ready_offset = max(offset, min(len(self.log) - 1, self._judged_offset))
        contradiction = ContradictionCheck(self.s.max_contradiction_share, self.s.contradiction_confidence,
                                           self.s.contradiction_window, self.s.contradiction_min_events)
        # -- nothing below can fail: the swap
        if base_data is not None:
            self._base_data_spec, self.base_train, self.base_holdout = base_data
        self.trainer = trainer
        self._next_mirror = mirror  # becomes the served mirror when this lineage is published
        self._adopted_at = time.monotonic()
        self.lineage = uuid.uuid4().hex[:12]
        self.base_version = store_version
        self._next_base_metrics = metrics
        self.applied_offset = offset
        self.ready_offset = ready_offset
        self.feedback_train: deque = deque(maxlen=20_000)
        self.feedback_holdout: deque = deque(maxlen=2_000)
        self._holdout_seen = 0
        self._served_score: tuple[tuple, float] | None = None
        self.followups = Followups(self.s)
        self.contradiction = contradiction
        self._store_seen = store_seen
        self.replaying = True
        logger.info("%s: lineage %s on store v%s (%s, log offset %s); replaying %s events before publishing",
                    reason, self.lineage, store_version, metrics.get("kind", "trained"), offset,
                    self.ready_offset - offset)

    def _load_base_data(self, data: dict | None) -> tuple[dict | None, list, list]:
        """(spec, base training examples, gate holdout) for a base's data record; changes nothing."""
        from train.data import load_dataset, spec_from_record

        base = None
        if data:
            try:
                base = load_dataset(spec_from_record(data))
            except (OSError, ValueError) as err:  # e.g. a user file that is not on this node
                logger.warning("base data unavailable (%s); the gate uses the feedback holdout only", err)
        rng = random.Random(0)
        # The gate judges on the validation split: the test split stays unseen by every decision,
        # so the accuracy reported on it (python -m bench drift) is not one the gate selected for.
        held = base.validation if base else []
        return data, (base.train if base else []), rng.sample(held, min(self.s.holdout_base_examples, len(held)))

    def _publish_lineage(self) -> None:
        """The replayed state becomes the lineage's first version (training thread)."""
        from online_learning.digest import model_digest
        from train.model import accuracy

        self.trainer.take_touched()
        mirror = self._next_mirror  # kept until the state is durable: a failure here is retried whole
        mirror.model.set_weights(self.trainer.model.get_weights())
        weights_digest = model_digest(mirror.model)
        digest = weights_digest.hexdigest()
        # Above every number seen, every replica's report included (they hold it), and free.
        version = self.numbers.lineage_first(self.reports.max_reported, self.pub.version if self.pub else 0)
        self._write_state(version)  # durable before any replica hears of it
        self._next_mirror = None
        with self._model_lock:  # the mirror and self.pub change together
            self.served, self._digest, self._digest_of = mirror, weights_digest, mirror
            self.served.version = version
            self.pub = Published(self.lineage, version, digest, self.applied_offset, version, time.time(),
                                 self.base_version)
        texts, labels = [e.text for e in self.base_holdout], [e.label for e in self.base_holdout]
        measured = accuracy(self.served, texts, labels) if texts else float("nan")
        self.anchor_base_accuracy = lineage_anchor(self._next_base_metrics, measured) if texts else measured
        if measured < self.anchor_base_accuracy - self.s.max_base_drop:
            # Published all the same: replicas need this lineage, and its rounds are held to the
            # kept anchor, so they cannot publish lower; said so an operator sees the gap.
            logger.warning("lineage %s's first version scores %.3f on the base holdout, below the anchor %.3f it "
                           "keeps from v%s", self.lineage, measured, self.anchor_base_accuracy, self.base_version)
        self.replaying = False
        self.history.append({"time": time.time(), "lineage": self.lineage, "version": version, "published": True,
                             "base": self.base_version, "log_offset": self.applied_offset, "digest": digest,
                             "base_accuracy": measured, "anchor_base_accuracy": self.anchor_base_accuracy,
                             "events": 0, "bytes": 0})
        self._metrics.published(version, 0, "lineage")
        logger.info("published lineage %s as v%s (digest %s, log offset %s)", self.lineage, version, digest,
                    self.applied_offset)

    # -- feedback --------------------------------------------------------------------------
    async def admit(self, client: str, auth_ok: bool) -> int:
        """One app-wide rate budget per client (every replica asks here): 0, or Retry-After seconds."""
        self._loop_threads.add(threading.get_native_id())
        return self._limiter.admit(client, auth_ok)

    async def submit(self, events: list[dict]) -> dict:
        reply = await self._submit(events)
        self._metrics.submitted(reply)
        return reply

    async def _submit(self, events: list[dict]) -> dict:
        """Append to the durable log (fsync); the training thread reads new events from the log.

        {"results": [(offset, duplicate), ...]}, or {"conflict": {"event_id", "offset"}} when an
        id already names another event (then nothing of the batch was written), or
        {"not_owner": {"epoch", "message"}} when this learner does not own the log (a standby, or
        one that was superseded): nothing written, the caller retries (another replica may own it)."""
        if not self._log_open or self._fenced:
            return self._not_owner()
        evs = [FeedbackEvent(e["event_id"], e["text"], e["label"]) for e in events]
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self.log.append, evs)
        except NotOwner as err:  # nothing written: the owner now is another learner
            self._lost_ownership(err)
            return self._not_owner()
        except EventIdConflict as err:
            return {"conflict": {"event_id": err.event_id, "offset": err.offset}}
        except LogWriteError as err:  # nothing written, nothing acknowledged; the log is as before
            logger.error("feedback log write failed: %s", err)
            return {"write_error": {"errno": err.errno_name, "message": str(err)}}
        self.reports.acknowledged([off for off, dup in results if not dup])  # its own monotonic clock
        self._wake.set()
        return {"results": results}

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

    def _round_or_roll_back(self, batch: list[LoggedEvent]) -> int:
        """`_round`; if it fails partway (a mark, the state file or the store cannot be written),
        the learner's copy returns to the served weights and the batch is read again next round:
        judged again, never passed over (which would let a restart replay it unchecked)."""
        offset, judged = self.applied_offset, self._judged_offset
        try:
            return self._round(batch)
        except Exception:
            if self.replaying:  # the copy is the new base plus what was replayed, not the served model:
                raise  # nothing to go back to (replayed events were judged before; none is judged here)
            self._back_to_served()
            self.applied_offset, self._judged_offset = offset, judged
            raise

    def _next_batch(self) -> list[LoggedEvent]:
        """The next events to learn; while replaying, only those judged before the lineage began
        (later ones wait for its first publish and are judged then, so a replay cannot run forever
        and never trains an unjudged event unchecked)."""
        batch, skipped = next_batch(self.log, self.applied_offset, self.ready_offset if self.replaying else None,
                                    self.s.max_round_events)
        if skipped and self._warned_gap != (self.applied_offset, skipped):
            # The base is older than the log's compaction point: those events are in no snapshot
            # this lineage holds and can never be replayed. Said once per gap, not every loop.
            self._warned_gap = (self.applied_offset, skipped)
            self.compacted_unlearned += skipped
            logger.error("lineage %s (base v%s, log offset %s): events %s..%s were compacted before it learned "
                         "them; it goes on without them (the snapshot the log was compacted against holds them, "
                         "this base does not)",
                         self.lineage, self.base_version, self.applied_offset, self.applied_offset + 1,
                         self.applied_offset + skipped)
        return batch

    def _is_holdout(self, offset: int) -> bool:
        return is_holdout(self._salt, offset, self.s.holdout_percent)

    def _round(self, batch: list[LoggedEvent]) -> int:
        """Train one round (new events, or replay only) and publish or hold back the candidate;
        returns how many new events it kept for training (0 when refused or held back)."""
        started = time.time()
        unknown = [e for e in batch if e.label not in self.trainer.index]
        if unknown:  # a label this lineage's model lacks (the log outlived a label set): never trainable
            logger.warning("skipping %s events with labels the model lacks, e.g. %r", len(unknown), unknown[0].label)
            if not self.replaying:
                self.log.mark([e.offset for e in unknown], "rejected")
                self._metrics.events("rejected", len(unknown))
            batch_known = [e for e in batch if e.label in self.trainer.index]
        else:
            batch_known = batch
        # A replay leaves out what the gate refused or held back when it first came.
        held_out = [e for e in batch_known if (e.holdout or self._is_holdout(e.offset)) and not e.rejected]
        train = [e for e in batch_known if not (e.holdout or e.rejected or e.deferred or self._is_holdout(e.offset))]
        if held_out and not self.replaying:
            self.log.mark([e.offset for e in held_out], "holdout")  # the fine-tune leaves them out too
        entry = {"time": started, "events": len(batch)}
        flagged: set[int] = set()  # offsets of confident contradictions among the new events
        if batch and not self.replaying:
            new = train + held_out
            flags = self.contradiction.flags(self.served, [e.text for e in new], [e.label for e in new])
            flagged = {e.offset for e, f in zip(new, flags) if f}
            if reason := self.contradiction.verdict(flags):
                self.log.mark(sorted(flagged), "rejected")
                self.refused += len(flagged)
                self._metrics.events("refused", len(flagged))
                entry.update(refused=len(flagged), refused_reason=reason)
                logger.warning("refused %s events: %s", len(flagged), reason)
                train = [e for e in train if e.offset not in flagged]
                held_out = [e for e in held_out if e.offset not in flagged]
                if not train and not held_out:  # nothing left to learn: no candidate, no follow-ups of its own
                    self.applied_offset = batch[-1].offset
                    entry.update(log_offset=self.applied_offset, published=False, version=None, bytes=0)
                    self.history.append(entry)
                    self._judged(batch[-1].offset)
                    return 0
        rng = random.Random(self.trainer.steps)
        earlier = list(self.feedback_train)
        if not batch:  # a follow-up replays the current burst (and at least the newest 512), not all history
            earlier = earlier[-max(self.followups.burst_events, self.s.followup_replay_events):]
        n_replay = max(self.s.replay_events, self.s.replay_ratio * len(train)) if batch else self.s.followup_replay_events
        replayed = rng.sample(earlier, min(n_replay, len(earlier)))
        # Base rehearsal in proportion to all feedback the round trains on, replayed included:
        # follow-up rounds are replay only, and rehearsing base data only against the new events
        # let them erode the base (measured: docs/DRIFT.md).
        n_base = max(self.s.base_replay_events, int(self.s.base_replay_ratio * (len(train) + len(replayed))))
        examples = [(e.text, e.label) for e in train + replayed]
        examples += [(e.text, e.label) for e in rng.sample(self.base_train, min(n_base, len(self.base_train)))]
        rng.shuffle(examples)
        loss = self.trainer.train([t for t, _ in examples], [y for _, y in examples], self.s.batch_size) if examples else float("nan")
        if batch:
            self.applied_offset = batch[-1].offset
            self.replayed += len(batch) if self.replaying else 0
        self.feedback_holdout.extend(held_out)
        self._holdout_seen += len(held_out)
        entry.update(log_offset=self.applied_offset, loss=loss)
        kept = 0
        if self.replaying:  # judged when they first arrived; the lineage publishes once caught up
            self.feedback_train.extend(train)
            kept = len(train)
            entry.update(published=False, replay=True)
        elif self._gate(entry) or self._repair(entry):
            self._judged_offset = max(self._judged_offset, self.applied_offset)  # in the state _publish writes
            self._publish(entry)
            self.feedback_train.extend(train)
            kept = len(train)
        else:
            self._hold_back(entry)
            if entry["reason"].startswith("base"):  # not learnable here without forgetting: left to a
                # fine-tune, except confident contradictions (a relabelling the check let through)
                self.log.mark([e.offset for e in train if e.offset not in flagged], "deferred")
                self.log.mark([e.offset for e in train if e.offset in flagged], "rejected")
                self._metrics.events("deferred", sum(e.offset not in flagged for e in train))
                self._metrics.events("rejected", sum(e.offset in flagged for e in train))
            elif entry["reason"] == NO_HOLDOUT:  # not judgeable here: left to a fine-tune
                self.log.mark([e.offset for e in train], "deferred")
                self._metrics.events("deferred", len(train))
            else:  # judged bad: not replayed, not fine-tuned on
                self.log.mark([e.offset for e in train], "rejected")
                self._metrics.events("rejected", len(train))
            if batch:
                self._judged(batch[-1].offset)  # after the marks: a crash between them judges again
        self.history.append(entry)
        return kept

    def _gate(self, entry: dict) -> bool:
        """Score the candidate on the base and feedback holdouts (recorded in `entry`) and judge it
        (round_policy.gate_reason); the reason for holding it back goes to entry["reason"]."""
        from train.model import accuracy

        base_texts, base_labels = [e.text for e in self.base_holdout], [e.label for e in self.base_holdout]
        fb = list(self.feedback_holdout)
        fb_texts, fb_labels = [e.text for e in fb], [e.label for e in fb]
        base_acc = accuracy(self.trainer.loaded, base_texts, base_labels) if base_texts else None
        fb_acc = accuracy(self.trainer.loaded, fb_texts, fb_labels) if fb_texts else None
        served_fb = self._served_accuracy(fb_texts, fb_labels) if fb_texts else None
        entry.update(base_accuracy=base_acc, anchor_base_accuracy=self.anchor_base_accuracy,
                     holdout_accuracy=fb_acc, served_holdout_accuracy=served_fb,
                     holdout_size=len(fb_texts), base_holdout_size=len(base_texts))
        entry.pop("reason", None)
        reason = gate_reason(self.s, base_acc, self.anchor_base_accuracy, fb_acc, served_fb, len(fb_texts))
        if reason is None:
            return True
        entry["reason"] = reason
        return False

    def _repair(self, entry: dict) -> bool:
        """A candidate that only failed the base check gets up to `base_repair_rounds` passes of
        base rehearsal, then is judged again. New knowledge that merely crowds the old (a new
        language) recovers; a stream that contradicts the base (relabelled sentences) does not,
        since the rehearsal undoes exactly what it taught, and the feedback check still applies."""
        rng = random.Random(self.trainer.steps)
        for attempt in range(1, self.s.base_repair_rounds + 1):
            if not entry.get("reason", "").startswith("base") or not self.base_train:
                return False
            sample = rng.sample(self.base_train, min(self.s.base_repair_examples, len(self.base_train)))
            self.trainer.train([e.text for e in sample], [e.label for e in sample], self.s.batch_size)
            entry["repairs"] = attempt
            if self._gate(entry):
                return True
        return False

    def _served_accuracy(self, texts: list[str], labels: list[str]) -> float:
        """The served version's holdout score; recomputed only when the version or holdout changed."""
        from train.model import accuracy

        key = (self.pub.version, self._holdout_seen)
        if self._served_score is None or self._served_score[0] != key:
            self._served_score = (key, accuracy(self.served, texts, labels))
        return self._served_score[1]

    def _back_to_served(self) -> None:
        """The learner's copy back to the served weights, the optimiser state of what was touched reset."""
        with self._model_lock:
            weights = self.served.model.get_weights()
        self.trainer.model.set_weights(weights)
        self.trainer.reset_optimizer(self.trainer.take_touched())

    def _hold_back(self, entry: dict) -> None:
        """Back to the served weights, the optimiser state of what was touched reset with them."""
        self.held_back += 1
        self._back_to_served()
        entry.update(published=False, version=None, bytes=0)
        logger.warning("held back a candidate: %s", entry["reason"])

    def _publish(self, entry: dict) -> None:
        from online_learning.weights import apply_update, make_delta, update_bytes

        pub = self.pub
        version = self.numbers.after(pub.version)
        # A jump over another publisher's number breaks the delta chain: replicas get full weights.
        chain_base = pub.chain_base if version == pub.version + 1 else version
        delta = make_delta(self.trainer.model, self.trainer.take_touched(), version, self.applied_offset)
        self._write_state(version)  # durable before any replica hears of it
        self.numbers.used(version)
        with self._model_lock:
            apply_update(self.served.model, delta, self._served_digest())
            self.served.version = version
            digest = self._digest.hexdigest()
            delta.update(lineage=self.lineage, digest=digest, epoch=self._owner.epoch)
            deltas = {v: r for v, r in pub.deltas.items() if v > version - self.s.retain_deltas}
            deltas[version] = ray.put(delta)
            self.pub = Published(self.lineage, version, digest, self.applied_offset, chain_base, time.time(), pub.base,
                                 deltas)
        entry.update(published=True, version=version, digest=digest, bytes=update_bytes(delta),
                     rows=int(delta["rows"].size))

    def _served_digest(self):
        """The served mirror's WeightsDigest, kept current as deltas apply (call with the lock)."""
        from online_learning.digest import model_digest

        if getattr(self, "_digest_of", None) is not self.served:
            self._digest, self._digest_of = model_digest(self.served.model), self.served
        return self._digest

    def _maybe_snapshot(self, force: bool = False) -> None:
        from train.model import save_model_dir

        pub = self.pub
        due = time.monotonic() - getattr(self, "_last_snapshot", 0.0) >= self.s.snapshot_interval_s
        if pub is None or not (force or due) or pub.version <= self._store_seen:
            return
        self._last_snapshot = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            with self._model_lock:  # the mirror as published under pub (the thread is its only writer)
                self.served.metrics = {**self.served.metrics, "log_offset": pub.log_offset, "kind": "online-snapshot",
                                       "lineage": pub.lineage, "digest": pub.digest, "base_version": pub.base,
                                       "snapshot_at": time.time(),
                                       # the next lineage started on this snapshot keeps this bar
                                       "anchor_base_accuracy": None if math.isnan(self.anchor_base_accuracy)
                                       else self.anchor_base_accuracy}
                save_model_dir(self.served, tmp)
            try:
                self._owner.check()
                self.store.publish(tmp, version=pub.version)
            except ValueError as err:  # someone else took the number: our next publish goes above it
                logger.warning("snapshot v%s not stored: %s", pub.version, err)
                return
        self._store_seen = max(self._store_seen, pub.version)
        self._owner.check()
        removed = self.store.gc(keep_last=self.s.store_keep_last, keep={pub.base, self.base_version, pub.version})
        if removed.get("versions"):
            logger.info("model store retention removed versions %s", removed["versions"])
        dropped = self.log.compact(pub.log_offset + 1)  # keeps `retain_events` for fine-tunes
        if dropped:
            logger.info("compacted %s feedback events below the snapshot's offset", dropped)
        logger.info("snapshot %s/v%s (log offset %s) written to %s", pub.lineage, pub.version, pub.log_offset,
                    self.store.shown)

    def _maybe_rebase(self) -> None:
        """Adopt a model someone else published to the store (a fine-tune or a plain retrain):
        a new lineage on it, the log after its offset replayed (all of it for a plain retrain)."""
        newer = [v for v in self.store.versions() if v > self._store_seen]
        foreign = [v for v in newer if self.store.metrics(v).get("kind") != "online-snapshot"]
        if not foreign:  # nothing, or a learner's own snapshots
            self._store_seen = max(newer, default=self._store_seen)
            return
        latest = foreign[-1]
        metrics = self.store.metrics(latest)
        if not self._adoptable(metrics):
            self._store_seen = max(newer)
            logger.error("not adopting v%s: it includes feedback up to offset %s, and the log after it was "
                         "compacted (kept from %s); the current lineage stays", latest,
                         metrics.get("log_offset", -1), self.log.first_offset)
            self.history.append({"time": time.time(), "refused": latest, "published": False, "events": 0, "bytes": 0,
                                 "reason": "log compacted below its offset"})
            return
        rebase_from = self.pub
        self._adopt(latest, reason=f"adopting {metrics.get('kind', 'a retrained model')} v{latest}")
        self._store_seen = max(newer)  # only once adopted: a failed load is retried next check
        self.pub = rebase_from  # replicas keep the current lineage until the new one has replayed
        self.history.append({"time": time.time(), "rebased_on": latest, "lineage": self.lineage, "published": False,
                             "log_offset": self.applied_offset, "bytes": 0, "events": 0})

    def _adoptable(self, metrics: dict) -> bool:
        """A base can start a lineage only if the log still holds every event after its offset."""
        return metrics.get("log_offset", -1) + 1 >= self.log.first_offset

    def _judged(self, offset: int) -> None:
        """Events up to `offset` were judged and their marks are durable: say so durably, so that
        a restart replays them without judging them again."""
        if offset > self._judged_offset:
            self._judged_offset = offset
            self._write_state(max(self.numbers.floor, self.pub.version if self.pub else 0))  # no number goes back

    def _write_state(self, version: int) -> None:
        """Durably, before `version` is published: numbers used are never reused after a crash.
        Raises NotOwner (writing nothing) when this learner no longer owns the state_dir."""
        self._state.write(LearnerState(version=max(self.numbers.floor, version), holdout_salt=self._salt,
                                       lineage=self.lineage, log_offset=self.applied_offset,
                                       judged_offset=self._judged_offset, epoch=self._owner.epoch))

    # -- replicas --------------------------------------------------------------------------
    async def updates_since(self, replica: str, identity: dict) -> dict:
        """What a replica holding `identity` (lineage, version, digest, log_offset) needs:
        wait (no lineage published yet, or this learner is a standby), none, relabel (same
        digest), deltas, or full weights. `learner` carries `epoch`, the ownership epoch of the
        learner answering (0 for a standby, which owns nothing), as does every update dict: a
        replica ignores updates from an epoch below the highest it has seen.
        Never blocks the event loop: full weights are built once per version in a thread."""
        self._loop_threads.add(threading.get_native_id())  # spared by _lower_priority
        self.reports.report(replica, identity)
        self._metrics.replica_report(replica, identity.get("log_offset"), self.reports.acked, self.reports.clock())
        # a standby too: its first number goes above them all
        if not self._ready:  # a standby (epoch 0: it owns nothing), or an owner still adopting its base
            owning = self._log_open and not self._fenced
            return {"kind": "wait", "learner": {"published": False, "epoch": self._owner.epoch if owning else 0,
                                                "owner": owning}}
        pub = self.pub
        self.reports.prune(pub.log_offset if pub else -1)
        info = {"ready_offset": self.ready_offset, "published": pub is not None, "epoch": self._owner.epoch,
                "owner": self._fenced is None,
                "published_at": pub.published_at if pub else None, "base_version": pub.base if pub else None,
                **(pub.identity() if pub else {})}
        kind, versions = plan_update(identity, pub)
        if kind == "deltas":
            return {"kind": kind, "learner": info, "refs": [pub.deltas[v] for v in versions]}
        if kind == "full":
            return {"kind": kind, "learner": info, "refs": [await self._full_ref()]}
        return {"kind": kind, "learner": info}

    async def _full_ref(self):
        """One full copy per published version, built off the event loop and shared by callers."""
        pub = self.pub
        stale = self._full is None or self._full[0] != pub.version
        if stale or (self._full[1].done() and self._full[1].exception() is not None):  # a failed build: retry
            future = asyncio.get_running_loop().run_in_executor(None, self._build_full)
            self._full = (pub.version, asyncio.ensure_future(future))
        return await asyncio.shield(self._full[1])

    def _build_full(self):
        from online_learning.weights import make_full

        with self._model_lock:  # the mirror and self.pub change together under this lock
            pub = self.pub
            full = make_full(self.served.model, pub.version, pub.log_offset)
        full.update(lineage=pub.lineage, digest=pub.digest, epoch=self._owner.epoch)
        return ray.put(full)

    async def status(self) -> dict:
        if not self._ready:  # a standby, or an owner still adopting its base: nothing of its own to report yet
            owning = self._log_open and not self._fenced
            return {"owner": owning, "standby": not self._log_open, "epoch": self._owner.epoch if owning else 0,
                    "owner_epoch": self._owner.current_epoch(),
                    "lineage": None, "version": None, "digest": None, "published_at": None, "replaying": False,
                    "pid": os.getpid(), "publish_interval_s": self.s.publish_interval_s,
                    "max_staleness_s": self.s.max_staleness_s, "replicas": {}, "history": []}
        pub = self.pub
        self.reports.prune(pub.log_offset if pub else -1)
        live = self.reports.live()
        return {
            "lineage": pub.lineage if pub else None, "version": pub.version if pub else None,
            "digest": pub.digest if pub else None, "published_at": pub.published_at if pub else None,
            "replaying": self.replaying, "next_lineage": self.lineage if self.replaying else None,
            "base_version": pub.base if pub else None, "next_base_version": self.base_version if self.replaying else None,
            "ready_offset": self.ready_offset, "judged_offset": self._judged_offset,
            "compacted_unlearned": self.compacted_unlearned,
            "applied_offset": self.applied_offset, "served_offset": pub.log_offset if pub else None,
            "log_length": len(self.log), "replayed_on_start": self.replayed,
            "pending": max(0, len(self.log) - 1 - self.applied_offset), "held_back": self.held_back,
            "refused": self.refused,
            "followups_left": math.ceil(self.followups.left),
            "pid": os.getpid(), "staleness_s": self.reports.staleness_s(),
            "owner": self._fenced is None, "standby": False, "epoch": self._owner.epoch, "fenced": self._fenced,
            "publish_interval_s": self.s.publish_interval_s, "max_staleness_s": self.s.max_staleness_s,
            "replicas": live, "history": list(self.history)[-50:],
            "feedback_outcomes": self._metrics.counts(), "log": self.log.stats(),
        }

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
