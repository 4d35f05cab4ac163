"""The publish path: the served mirror (the weights replicas are told to hold) and `pub`
(what they are told, replaced whole under `_model_lock`), a lineage's first version, each
delta, full weights for replicas that need them, the durable state written before any replica
hears of a number, and snapshots into the model store (with store retention and log compaction).

`Publishing` is a part of the OnlineLearner deployment (online_learning/learner.py): publishes
and snapshots run on the learner's training thread; full weights are built in an executor for
`updates_since` on the event loop, under the same lock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time

import ray

from online_learning.replicas import Published
from online_learning.round_policy import lineage_anchor
from train.learner_state import LearnerState

logger = logging.getLogger("ray.serve")


class Publishing:
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

    def _publish(self, entry: dict) -> None:
        from online_learning.weights import apply_update, make_delta

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
            delta = delta.named(self.lineage, digest, self._owner.epoch)
            deltas = {v: r for v, r in pub.deltas.items() if v > version - self.s.retain_deltas}
            deltas[version] = ray.put(delta)
            self.pub = Published(self.lineage, version, digest, self.applied_offset, chain_base, time.time(), pub.base,
                                 deltas)
        entry.update(published=True, version=version, digest=digest, bytes=delta.nbytes, rows=int(delta.rows.size))

    def _served_digest(self):
        """The served mirror's WeightsDigest, kept current as deltas apply (call with the lock)."""
        from online_learning.digest import model_digest

        if getattr(self, "_digest_of", None) is not self.served:
            self._digest, self._digest_of = model_digest(self.served.model), self.served
        return self._digest

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
                                       judged_offset=self._judged_offset, epoch=self._owner.epoch,
                                       base_version=self.base_version, store_seen=self._store_seen, store_pending=tuple(sorted(self._store_pending))))

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
        self._used_number(pub.version)
        self._owner.check()
        removed = self.store.gc(keep_last=self.s.store_keep_last, keep={pub.base, self.base_version, pub.version})
        if removed.get("versions"):
            logger.info("model store retention removed versions %s", removed["versions"])
        dropped = self.log.compact(pub.log_offset + 1)  # keeps `retain_events` for fine-tunes
        if dropped:
            logger.info("compacted %s feedback events below the snapshot's offset", dropped)
        logger.info("snapshot %s/v%s (log offset %s) written to %s", pub.lineage, pub.version, pub.log_offset,
                    self.store.shown)

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
        from train.model import model_signature

        with self._model_lock:  # the mirror and self.pub change together under this lock
            pub = self.pub
            full = make_full(self.served.model, pub.version, pub.log_offset, model_signature(self.served))
        return ray.put(full.named(pub.lineage, pub.digest, self._owner.epoch))
