"""The replica's model follower: loads the model, follows the learner, and says whether the replica is ready.

Everything a replica knows about its model lives here; the Classifier (serve/classifier.py) only
answers HTTP over it. Loading, updates and model calls share the replica's one model thread, so an
update lands between two batches, never inside one, and each answer names the version that made it.

Fencing: the learner's answers and each update it publishes carry the ownership epoch of the
learner that made them (`epoch`; 0 from a learner that names none). A learner that lost ownership of the
feedback log keeps its older epoch, so the follower remembers the highest epoch it has seen and
ignores any answer or update below it: a superseded learner cannot get one more publish onto this
replica. An answer from a learner that says it owns no log (`owner: false`: a standby during a
handover) changes nothing either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from online_learning.metrics import ReplicaMetrics
from online_learning.protocol import LearnerInfo, Update, UpdatesAnswer

from serve.settings import AppSettings

logger = logging.getLogger("ray.serve")

# A poll waits at most max(POLL_TIMEOUT_MIN_S, POLL_TIMEOUT_POLLS * replica_poll_s): a hung learner
# (stopped, deadlocked) must read as unreachable rather than freeze the poller, while a learner that
# builds full weights for a new version (seconds for the large model) must not read as down.
POLL_TIMEOUT_MIN_S = 5.0
POLL_TIMEOUT_POLLS = 4
GOODBYE_TIMEOUT_S = 2.0  # a stopping replica waits at most this long to tell the learner


class ModelFollower:
    """One replica's served model (`model`, a serve.runner.ServedModel once loaded) and what it
    knows of the learner. `start` loads and catches up; then a task polls until the replica stops."""

    def __init__(self, settings: AppSettings, learner, replica: str, pool: ThreadPoolExecutor):
        self.settings = settings
        self.learner = learner  # a handle to the OnlineLearner deployment, or None
        self.replica = replica
        self.pool = pool  # the replica's one model thread: model calls and updates, one at a time
        self.model = None  # a ServedModel once loaded; updates land in it on the model thread
        self.sync_error: str | None = None  # why the last poll of the learner failed; None when it answered
        self.learner_info: LearnerInfo | None = None  # what the learner serves, from its last answer
        self.epoch = 0  # the highest ownership epoch seen: anything below it comes from a fenced learner
        self._fenced_logged: set[str] = set()  # reasons already logged, so a poll loop logs each once
        self._fresh_at = time.monotonic()  # when this replica last knew it held the learner's version
        self._poller: asyncio.Task | None = None
        self._metrics = ReplicaMetrics(replica, settings.learner.max_staleness_s if settings.learner else None)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the store's newest version, catch up with the learner (bounded by
        `startup_sync_timeout_s`), then follow in a background task."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self.pool, self.load_latest) and self.learner is not None:
            try:  # catch up with the learner before taking traffic
                await asyncio.wait_for(self._catch_up(), timeout=self.settings.learner.startup_sync_timeout_s)
            except Exception as err:  # learner down: serve the store's version rather than nothing
                self.sync_error = repr(err)
                logger.warning("started on v%s without the learner's current weights (%r)", self.model.version, err)
        self._poller = loop.create_task(self._follow())

    async def stop(self) -> None:
        """Serve stopping this replica: stop polling, then tell the learner (bounded wait), so a
        replica replaced in a rollout stops counting in the learner's staleness figure at once."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)  # no poll in flight after the goodbye
        if self.learner is None:
            return
        try:
            await asyncio.wait_for(self.learner.goodbye.remote(self.replica), timeout=GOODBYE_TIMEOUT_S)
        except Exception as err:  # the learner gone too: it forgets silent replicas after REPLICA_LIVE_S
            logger.info("could not tell the learner this replica stops: %r", err)

    def health_problem(self) -> str | None:
        """Why Serve should replace this replica, or None: the poller died, or (only while the
        learner answers) the replica is further behind it than `staleness_hard_limit_s`."""
        poller = self._poller
        if poller is not None and poller.done() and poller.exception() is not None:
            return f"model store polling failed: {poller.exception()!r}"
        limit = self.settings.learner.staleness_hard_limit_s if self.settings.learner else None
        # Only with a learner, and while it answers: if it is down, a new replica would be no
        # fresher (without one, nothing ever refreshes the clock: every replica would be replaced
        # once the limit had passed after it started).
        if limit and self.learner is not None and self.sync_error is None and self.staleness_s() > limit:
            return f"{self.staleness_s():.0f} s behind the learner (hard limit {limit} s)"
        return None

    async def classify(self, texts: list[str], top_ks: list[int]) -> list:
        """One model call for a batch, on the model thread: one version per batch. A text the
        model fails on gets a ModelError; its neighbours in the batch get their answers."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.model.classify_isolated, texts, top_ks)

    # -- loading ---------------------------------------------------------------------------
    def load_latest(self) -> bool:
        """Load the store's newest version, if there is one (on the model thread: it traces the model)."""
        from serve.runner import ServedModel
        from train.store import ModelStore

        store = ModelStore(self.settings.model_store)
        if store.latest() is None:
            return False
        self._install(ServedModel(store.load()))
        return True

    def _install(self, served) -> None:
        self.model = served
        self._metrics.served(served.version, served.lineage)
        logger.info("replica %s serves model version %s", self.replica, served.version)

    def _model_for(self, info: LearnerInfo, updates: list[Update]):
        """Full weights of another model than the one served (a retrain into another family or
        label set): load the lineage's base version from the store, then take the weights."""
        from serve.runner import ServedModel
        from train.store import ModelStore

        served = ServedModel(ModelStore(self.settings.model_store).load(info.base_version))
        served.apply(updates)
        return served

    # -- following the learner -------------------------------------------------------------
    async def _follow(self) -> None:
        """Until a model exists, look in the store; then pull new versions from the learner."""
        if self.model is None:
            logger.warning("no model in %s yet; /healthz answers 503 until one is published", self.settings.model_store)
        while self.model is None:
            await asyncio.sleep(self.settings.model_poll_s)
            await asyncio.get_running_loop().run_in_executor(self.pool, self.load_latest)
        while self.learner is not None:
            await asyncio.sleep(self.settings.learner.replica_poll_s)
            try:
                await self.sync()
                self.sync_error = None
            except Exception as err:  # the learner restarting: keep serving what we have
                if self.sync_error is None:
                    logger.warning("cannot reach the learner (%r); serving v%s meanwhile", err, self.model.version)
                self.sync_error = repr(err)
            self._metrics.staleness(self.staleness_s())

    async def _catch_up(self) -> None:
        """Sync until this replica is ready: on the learner's lineage, or holding every event the
        learner had judged when it began it (while it replays: its `ready_offset`)."""
        while True:
            try:
                await self.sync()
                info = self.learner_info
                if info is not None and info.ready_offset is not None and self.readiness()[0]:
                    return  # an owner with a target answered, and this replica meets it
            except Exception as err:  # the learner still starting (a poll timed out): retry to the deadline
                logger.info("waiting for the learner: %r", err)
            await asyncio.sleep(self.settings.learner.replica_poll_s)

    async def sync(self) -> None:
        """Ask the learner what this replica is missing, and apply it."""
        timeout = max(POLL_TIMEOUT_MIN_S, POLL_TIMEOUT_POLLS * self.settings.learner.replica_poll_s)
        reply: UpdatesAnswer = await asyncio.wait_for(
            self.learner.updates_since.remote(self.replica, self.model.poll_identity), timeout=timeout)
        if self._fenced(reply.learner, "answer"):
            return  # nothing fetched from a superseded learner
        updates = list(await asyncio.gather(*reply.refs))  # from this node's object store
        await self.apply(reply, updates)

    def _fenced(self, answer: LearnerInfo | Update, what: str) -> bool:
        """Whether to ignore `answer` (the learner's info, or one update): it comes from an epoch
        below the highest seen, or from a learner that says it does not own the log (a standby,
        or one that found itself superseded). Logged once per reason, not once per poll."""
        epoch = answer.epoch
        if epoch < self.epoch:
            why = f"ownership epoch {epoch}, below epoch {self.epoch} already seen (a superseded learner)"
        elif isinstance(answer, LearnerInfo) and not answer.owner:
            why = f"a learner that does not own the feedback log (epoch {epoch})"
        else:
            return False
        log = logger.warning if why not in self._fenced_logged else logger.debug
        self._fenced_logged.add(why)
        log("replica %s: ignored an %s from %s", self.replica, what, why)
        return True

    async def apply(self, reply: UpdatesAnswer, updates: list[Update]) -> bool:
        """Apply one answer of `updates_since` (`reply`, its refs already fetched as `updates`).

        False, and nothing changed, when the answer or any of its updates comes from an ownership
        epoch below the highest this replica has seen, or the learner says it owns no log. True
        otherwise, a refused update included (the replica keeps its weights, and its next poll
        asks for full weights)."""
        from serve.runner import DigestMismatch, ModelMismatch

        info, kind = reply.learner, reply.kind
        if self._fenced(info, "answer") or any(self._fenced(u, "update") for u in updates):
            return False
        self.epoch = max([self.epoch, info.epoch, *(u.epoch for u in updates)])
        served = self.model
        loop = asyncio.get_running_loop()
        try:
            if kind == "relabel":
                await loop.run_in_executor(self.pool, served.relabel, info.identity)
            elif kind in ("deltas", "full"):
                try:
                    await loop.run_in_executor(self.pool, served.apply, updates)
                except ModelMismatch as err:
                    logger.warning("replica %s: %s; loading v%s from the store", self.replica, err, info.base_version)
                    served = await loop.run_in_executor(self.pool, self._model_for, info, updates)
                    self._install(served)  # swapped whole: a batch in flight finishes on the old model
        except DigestMismatch as err:  # nothing written; the next poll brings full weights
            logger.error("replica %s: %s", self.replica, err)
        self.learner_info = info
        if not info.published or served.identity == info.identity:
            self._fresh_at = time.monotonic()
        self._metrics.served(served.version, served.lineage)
        return True

    # -- what the replica reports ------------------------------------------------------------
    def staleness_s(self) -> float:
        return time.monotonic() - self._fresh_at

    _was_ready = False  # met the learner's target once: serving, not starting

    def readiness(self) -> tuple[bool, str]:
        """(ready, why). Ready: a model, and the learner's current lineage (or, while it replays,
        every event it had acknowledged); without a reachable learner, whatever this replica has.
        A replica that met the target once stays ready while it syncs to a newer one ("syncing":
        a new learner's lineage after a handover or deploy reaches every replica at once, and
        taking them all out of a load balancer would stop serving; staleness has its own bound)."""
        served, info = self.model, self.learner_info
        if served is None:
            return False, "no_model"
        if self.learner is None:
            return True, "ready"
        if self.sync_error is not None or info is None or info.ready_offset is None:
            # No answer, or one with no target yet (an owner still adopting its base after a
            # takeover): as when the learner is unreachable, serve what this replica has.
            return True, "learner_unreachable"
        on_lineage = info.identity is not None and served.lineage == info.identity.lineage
        if on_lineage or served.log_offset >= info.ready_offset:
            self._was_ready = True
            return True, "ready"
        return (True, "syncing") if self._was_ready else (False, "catching_up")
