"""Lineages: which store version a learner starts from, adopting a base (a new lineage whose
first version holds the log replayed after the base's offset), and adopting a model someone
else published to the store (a fine-tune or a plain retrain).

`Lineages` is a part of the OnlineLearner deployment (online_learning/learner.py): its methods
run on the learner's training thread (`_adopt` also at start) and read and write the learner's
lineage state (`trainer`, `lineage`, `base_version`, `applied_offset`, `ready_offset`, the
feedback deques, `replaying`); the first publish of a lineage is online_learning/publishing.py's.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import deque

from online_learning.contradiction import ContradictionCheck
from online_learning.round_policy import Followups

logger = logging.getLogger("ray.serve")


class Lineages:
    def _start_version(self, state=None) -> tuple[int, tuple[list[int], list[int]]]:
        """The store version to start from, and the store listing it was chosen from (`_adopt`
        takes it, so a version committed after it is still new to the learner). In order:
        a model someone else committed that the learner before this one had not looked at yet
        (`state`, the state file: above its `store_seen`, or one of its `store_pending`, e.g. a
        fine-tune that was still uploading below a snapshot's number); else that learner's own
        lineage (`state.lineage`): its newest snapshot, or its base when it has none yet (a
        fine-tune adopted below an older lineage's snapshot); else the newest version whose later
        feedback the log still holds (else the newest)."""
        listing = self.store.numbers()
        versions = listing[0]
        if not versions:
            raise FileNotFoundError(f"no model in {self.store.shown}; train one first: python -m train --size small")
        metrics = {v: self.store.metrics(v) for v in versions} if state is not None else {}
        if state is not None and state.store_seen is not None:
            unseen = [v for v in versions if v > state.store_seen or v in state.store_pending]
            for v in reversed(unseen):
                if metrics[v].get("kind") != "online-snapshot" and self._adoptable(metrics[v]):
                    return v, listing
        if state is not None and state.lineage and state.base_version in versions:
            own = [v for v in versions if metrics[v].get("kind") == "online-snapshot"
                   and metrics[v].get("lineage") == state.lineage]
            for v in [*reversed(own), state.base_version]:
                if self._adoptable(metrics[v]):
                    return v, listing
        for v in reversed(versions):
            if self._adoptable(metrics[v] if v in metrics else self.store.metrics(v)):
                return v, listing
            logger.error("not starting from v%s: the log after its offset was compacted", v)
        return versions[-1], listing

    def _adopt(self, store_version: int, reason: str, listing: tuple[list[int], list[int]] | None = None) -> None:
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
        # The listing the version was chosen from (None: list now): whatever commits after it is
        # still new at the next look, even below the numbers seen in it.
        committed, in_progress = self.store.numbers() if listing is None else listing
        store_seen = max(committed, default=0)
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
        self._store_pending = frozenset(v for v in in_progress if v < store_seen)
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

    def _maybe_rebase(self) -> None:
        """Adopt a model someone else published to the store (a fine-tune or a plain retrain):
        a new lineage on it, the log after its offset replayed (all of it for a plain retrain).
        New means committed since the last look: above `_store_seen`, or one of `_store_pending`
        (a publish that was uploading below a number this learner has seen or used)."""
        committed, in_progress = self.store.numbers()
        newer = [v for v in committed if v > self._store_seen or v in self._store_pending]
        foreign = [v for v in newer if self.store.metrics(v).get("kind") != "online-snapshot"]
        if not foreign:  # nothing, or a learner's own snapshots
            self._looked_at(committed, in_progress)
            return
        adoptable = [v for v in foreign if self._adoptable(self.store.metrics(v))]
        latest = adoptable[-1] if adoptable else foreign[-1]
        metrics = self.store.metrics(latest)
        if not adoptable:
            self._looked_at(committed, in_progress)
            logger.error("not adopting v%s: it includes feedback up to offset %s, and the log after it was "
                         "compacted (kept from %s); the current lineage stays", latest,
                         metrics.get("log_offset", -1), self.log.first_offset)
            self.history.append({"time": time.time(), "refused": latest, "published": False, "events": 0, "bytes": 0,
                                 "reason": "log compacted below its offset"})
            return
        rebase_from = self.pub
        self._adopt(latest, f"adopting {metrics.get('kind', 'a retrained model')} v{latest}", (committed, in_progress))
        self._looked_at(committed, in_progress)  # only once adopted: a failed load is retried next check
        self.pub = rebase_from  # replicas keep the current lineage until the new one has replayed
        self.history.append({"time": time.time(), "rebased_on": latest, "lineage": self.lineage, "published": False,
                             "log_offset": self.applied_offset, "bytes": 0, "events": 0})

    def _looked_at(self, committed: list[int], in_progress: list[int]) -> None:
        """The store's numbers (one listing) are looked at: every committed one up to the highest
        is seen; those still uploading below it stay pending, adopted when they commit. A pending
        number that disappeared was collected."""
        seen = max(self._store_seen, max(committed, default=0))
        self._store_pending = frozenset(v for v in in_progress if v < seen)
        self._store_seen = seen

    def _used_number(self, version: int) -> None:
        """This learner stored `version` (a snapshot): numbers between the last seen and it stay
        pending, committed or not (a fine-tune may commit there at any time), until a look."""
        if version <= self._store_seen:
            return
        self._store_pending |= frozenset(range(self._store_seen + 1, version))
        self._store_seen = version

    def _adoptable(self, metrics: dict) -> bool:
        """A base can start a lineage only if the log still holds every event after its offset."""
        return metrics.get("log_offset", -1) + 1 >= self.log.first_offset
