"""One learning round: the new events checked (contradictions, holdout), the learner's copy
trained with replay and base rehearsal, the candidate gated, repaired or held back, and each
event's outcome marked in the log. The decisions themselves (which events, gate verdicts,
follow-ups) are round_policy.py's, testable without Ray.

`Rounds` is a part of the OnlineLearner deployment (online_learning/learner.py): its methods run
on the learner's training thread; a passing candidate goes to `_publish`
(online_learning/publishing.py).
"""

from __future__ import annotations

import logging
import random
import time

from online_learning.round_policy import NO_HOLDOUT, gate_reason, is_holdout, next_batch
from train.log_reader import LoggedEvent

logger = logging.getLogger("ray.serve")


class Rounds:
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
        # follow-up rounds are replay only, and rehearsing base data against the new events alone
        # lets them erode the base (docs/DRIFT.md).
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
