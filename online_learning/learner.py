"""The OnlineLearner deployment: one per application; Serve restarts it when its process dies.

Feedback is appended to the durable log before it is acknowledged. A background thread trains
the learner's own copy in rounds (at most one per `publish_interval_s`), gates each candidate on
a holdout, and publishes passing versions as deltas in Ray's object store. Replicas pull what
they are missing (`updates_since`): the chain of deltas, or the full weights when they are too
far behind or the chain restarted. On start the learner loads the newest snapshot in the model
store and replays the log after that snapshot's offset.
"""

import asyncio
import json
import logging
import os
import random
import tempfile
import threading
import time
import zlib
from collections import deque
from pathlib import Path

import ray
from ray import serve

from online_learning.feedback_log import EventIdConflict, FeedbackEvent, FeedbackLog, LoggedEvent
from online_learning.rate_limit import FeedbackLimiter
from online_learning.settings import LearnerSettings

logger = logging.getLogger("ray.serve")
STATE_FILE = "learner_state.json"


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=2, health_check_timeout_s=10)
class OnlineLearner:
    def __init__(self, model_store: str, settings: dict, tf_threads: int = 1):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
        from online_learning.trainer import OnlineTrainer
        from train.data import DataSpec, load_dataset
        from train.store import ModelStore

        self.s = LearnerSettings(**settings)
        self.store = ModelStore(model_store)
        self.log = FeedbackLog(self.s.state_dir)
        snapshot = self.store.load()
        served = self.store.load(snapshot.version)  # a mirror of what replicas serve, for the gate
        self.trainer = OnlineTrainer(snapshot, self.s.learning_rate)
        self.served = served
        state = self._read_state()
        self.version = max(snapshot.version, state.get("version", 0))
        self.served_offset = snapshot.metrics.get("log_offset", -1)
        self.applied_offset = self.served_offset
        self.applied_count = self.served_offset + 1  # events in the snapshot; replay adds the rest
        # Deltas apply only on top of a state this learner published; after a restart with
        # publishes beyond the snapshot, replicas first get full weights.
        self.chain_base = snapshot.version if self.version == snapshot.version else None
        self.deltas: dict[int, ray.ObjectRef] = {}
        self._full: tuple[int, ray.ObjectRef] | None = None
        self._lock = threading.Lock()
        self._pending: list[LoggedEvent] = self.log.read_from(self.applied_offset + 1)
        self.replayed = len(self._pending)
        self._acked: deque = deque((e.offset, e.ts) for e in self._pending)  # not yet on every replica
        self._holdout_seen = 0  # feedback events ever put in the holdout: keys the served score
        self._served_score: tuple[tuple, float] | None = None
        base = self._base_data(snapshot.metrics.get("data"), DataSpec, load_dataset)
        rng = random.Random(0)
        self.base_train = base.train if base else []
        self.base_holdout = rng.sample(base.test, min(self.s.holdout_base_examples, len(base.test))) if base else []
        self.feedback_train: deque = deque(maxlen=20_000)
        self.feedback_holdout: deque = deque(maxlen=2_000)
        self.history: deque = deque(maxlen=200)
        self.replicas: dict[str, dict] = {}
        self.held_back = 0
        self._followups_left = 0
        self._last_snapshot = time.monotonic()
        self._store_seen = self.store.latest()
        self._limiter = FeedbackLimiter(self.s.rate_limit_per_s, self.s.rate_burst, self.s.auth_fail_rate_per_s,
                                        self.s.auth_fail_burst, self.s.rate_limit_clients)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._thread.start()
        logger.info("learner at version %s, snapshot v%s (log offset %s), replaying %s events",
                    self.version, snapshot.version, self.served_offset, self.replayed)

    @staticmethod
    def _base_data(data: dict | None, DataSpec, load_dataset):
        """The splits the base model was trained on, for replay and the gate's holdout."""
        if not data:
            return None
        try:
            return load_dataset(DataSpec(**{**data, "langs": tuple(data.get("langs") or ())}))
        except (OSError, ValueError) as err:  # e.g. a user file that is not on this node
            logger.warning("base data unavailable (%s); the gate uses feedback holdout only", err)
            return None

    # -- feedback --------------------------------------------------------------------------
    async def admit(self, client: str, auth_ok: bool) -> int:
        """One app-wide rate budget per client (every replica asks here): 0, or Retry-After seconds."""
        return self._limiter.admit(client, auth_ok)

    async def submit(self, events: list[dict]) -> dict:
        """Append to the durable log (fsync), queue for training.

        {"results": [(offset, duplicate), ...]}, or {"conflict": {"event_id", "offset"}} when an
        id already names another event (then nothing of the batch was written)."""
        evs = [FeedbackEvent(e["event_id"], e["text"], e["label"]) for e in events]
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self.log.append, evs)
        except EventIdConflict as err:
            return {"conflict": {"event_id": err.event_id, "offset": err.offset}}
        now = time.time()
        fresh = [LoggedEvent(off, ev.event_id, ev.text, ev.label, now) for ev, (off, dup) in zip(evs, results) if not dup]
        with self._lock:
            self._pending.extend(fresh)
            self._acked.extend((e.offset, now) for e in fresh)
        self._wake.set()
        return {"results": results}

    # -- the training thread ---------------------------------------------------------------
    def _run(self) -> None:
        last_round = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=self.s.publish_interval_s)
            self._wake.clear()
            wait = self.s.publish_interval_s - (time.monotonic() - last_round)
            if wait > 0 and self._stop.wait(wait):
                return
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                self._followups_left = self.s.followup_rounds
            elif self._followups_left > 0:
                self._followups_left -= 1  # replay-only: keep learning what just arrived
            else:
                self._maybe_rebase()
                self._maybe_snapshot()
                continue
            last_round = time.monotonic()
            self._round(batch)
            self._maybe_snapshot()

    def _is_holdout(self, event_id: str) -> bool:
        return zlib.crc32(event_id.encode()) % 100 < self.s.holdout_percent

    def _round(self, batch: list[LoggedEvent]) -> None:
        from train.model import accuracy

        started = time.time()
        train = [e for e in batch if not self._is_holdout(e.event_id)]
        held_out = [e for e in batch if self._is_holdout(e.event_id)]
        self.feedback_holdout.extend(held_out)
        self._holdout_seen += len(held_out)
        rng = random.Random(self.trainer.steps)
        earlier = list(self.feedback_train)
        n_replay = max(self.s.replay_events, self.s.replay_ratio * len(train))
        n_base = max(self.s.base_replay_events, len(train) // 2)
        examples = [(e.text, e.label) for e in train]
        examples += [(e.text, e.label) for e in rng.sample(earlier, min(n_replay, len(earlier)))]
        examples += [(e.text, e.label) for e in rng.sample(self.base_train, min(n_base, len(self.base_train)))]
        rng.shuffle(examples)
        self.feedback_train.extend(train)
        loss = self.trainer.train([t for t, _ in examples], [y for _, y in examples], self.s.batch_size) if examples else float("nan")
        if batch:
            self.applied_offset = batch[-1].offset
            self.applied_count += len(batch)
        holdout = self.base_holdout + list(self.feedback_holdout)
        texts, labels = [e.text for e in holdout], [e.label for e in holdout]
        candidate_acc = accuracy(self.trainer.loaded, texts, labels) if holdout else float("nan")
        served_acc = self._served_accuracy(texts, labels) if holdout else float("nan")
        entry = {"time": started, "events": len(batch), "log_offset": self.applied_offset, "loss": loss,
                 "holdout_accuracy": candidate_acc, "served_holdout_accuracy": served_acc, "holdout_size": len(holdout)}
        if holdout and candidate_acc < served_acc - self.s.gate_margin:
            self._hold_back(entry)
            for _ in train:  # rejected: not replayed into later rounds either
                self.feedback_train.pop()
        else:
            self._publish(entry)
        self.history.append(entry)

    def _served_accuracy(self, texts: list[str], labels: list[str]) -> float:
        """The served version's holdout score; recomputed only when the version or holdout changed."""
        from train.model import accuracy

        key = (self.version, self._holdout_seen)
        if self._served_score is None or self._served_score[0] != key:
            self._served_score = (key, accuracy(self.served, texts, labels))
        return self._served_score[1]

    def _prune_acked(self) -> None:
        """Forget ack times of events every live replica serves (call with the lock held)."""
        now = time.time()
        live = [v["log_offset"] for v in self.replicas.values() if now - v["reported_at"] < 30]
        lowest = min(live, default=self.served_offset)
        while self._acked and self._acked[0][0] <= lowest:
            self._acked.popleft()

    def _hold_back(self, entry: dict) -> None:
        self.held_back += 1
        self.trainer.model.set_weights(self.served.model.get_weights())  # back to the served state
        self.trainer.take_touched()
        entry.update(published=False, version=None, bytes=0)
        logger.warning("held back a candidate: holdout accuracy %.3f vs served %.3f (margin %.2f)",
                       entry["holdout_accuracy"], entry["served_holdout_accuracy"], self.s.gate_margin)

    def _publish(self, entry: dict) -> None:
        from online_learning.weights import apply_update, make_delta, update_bytes

        version = self.version + 1
        delta = make_delta(self.trainer.model, self.trainer.take_touched(), version, self.applied_offset)
        apply_update(self.served.model, delta)
        ref = ray.put(delta)
        with self._lock:
            self.deltas[version] = ref
            for old in sorted(self.deltas)[: -self.s.retain_deltas]:
                del self.deltas[old]
            self.version, self.served_offset, self._full = version, self.applied_offset, None
            if self.chain_base is None:
                self.chain_base = version  # replicas behind this get full weights
        self.served.version = version
        self._write_state()
        entry.update(published=True, version=version, bytes=update_bytes(delta), rows=int(delta["rows"].size))

    def _maybe_snapshot(self, force: bool = False) -> None:
        from train.model import save_model_dir

        due = time.monotonic() - self._last_snapshot >= self.s.snapshot_interval_s
        if not (force or due) or self.version <= (self.store.latest() or 0):
            return
        self.served.metrics = {**self.served.metrics, "log_offset": self.served_offset,
                               "kind": "online-snapshot", "snapshot_at": time.time()}
        with tempfile.TemporaryDirectory() as tmp:
            save_model_dir(self.served, tmp)
            self.store.publish(tmp, version=self.version)
        self._last_snapshot = time.monotonic()
        logger.info("snapshot v%s (log offset %s) written to %s", self.version, self.served_offset, self.store.uri)

    def _maybe_rebase(self) -> None:
        """Adopt a fine-tuned base (python -m train --fine-tune) and replay the log after it."""
        from online_learning.trainer import OnlineTrainer

        latest = self.store.latest()
        if latest is None or latest <= (self._store_seen or 0):
            return
        self._store_seen = latest
        metrics = self.store.metrics(latest)
        if metrics.get("kind") != "fine-tune":
            return  # our own snapshot
        trainer, served = OnlineTrainer(self.store.load(latest), self.s.learning_rate), self.store.load(latest)
        offset = metrics.get("log_offset", -1)
        with self._lock:
            self.trainer, self.served = trainer, served
            self.version = max(self.version, latest) + 1  # replicas on the old chain get full weights
            self.served.version = self.version
            self.chain_base, self.deltas, self._full = self.version, {}, None
            self.served_offset = self.applied_offset = offset
            self.applied_count = offset + 1
            self._pending = self.log.read_from(offset + 1)  # what the fine-tune did not see
        self._write_state()
        self.history.append({"time": time.time(), "rebased_on": latest, "version": self.version, "published": True,
                             "log_offset": offset, "bytes": 0, "events": 0})
        logger.info("rebased on fine-tuned v%s as v%s; replaying %s events", latest, self.version, len(self._pending))

    def _read_state(self) -> dict:
        path = Path(self.s.state_dir) / STATE_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_state(self) -> None:
        path = Path(self.s.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": self.version, "log_offset": self.served_offset}))
        os.replace(tmp, path)  # versions stay monotonic across restarts

    # -- replicas --------------------------------------------------------------------------
    async def updates_since(self, replica: str, version: int, log_offset: int) -> dict:
        """What a replica at `version` needs: nothing, the deltas after it, or full weights."""
        from online_learning.weights import make_full

        with self._lock:
            self.replicas[replica] = {"version": version, "log_offset": log_offset, "reported_at": time.time()}
            self._prune_acked()
            current = self.version
            if version == current:
                return {"kind": "none", "version": current}
            wanted = range(version + 1, current + 1)
            if self.chain_base is not None and version >= self.chain_base and all(v in self.deltas for v in wanted):
                return {"kind": "deltas", "version": current, "refs": [self.deltas[v] for v in wanted]}
            if self._full is None or self._full[0] != current:
                self._full = (current, ray.put(make_full(self.served.model, current, self.served_offset)))
            return {"kind": "full", "version": current, "refs": [self._full[1]]}

    async def status(self) -> dict:
        now = time.time()
        with self._lock:
            live = {r: v for r, v in self.replicas.items() if now - v["reported_at"] < 30}
            self._prune_acked()
            oldest_unserved = self._acked[0][1] if self._acked else None
            return {
                "version": self.version, "applied_offset": self.applied_offset, "applied_count": self.applied_count,
                "served_offset": self.served_offset, "log_length": len(self.log), "replayed_on_start": self.replayed,
                "pending": len(self._pending), "held_back": self.held_back, "pid": os.getpid(),
                "staleness_s": now - oldest_unserved if oldest_unserved else 0.0,
                "publish_interval_s": self.s.publish_interval_s, "max_staleness_s": self.s.max_staleness_s,
                "replicas": live, "history": list(self.history)[-50:],
            }

    async def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the learner's training thread stopped")

    def __del__(self):
        self._stop.set()
