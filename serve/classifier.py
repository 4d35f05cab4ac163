"""The Classifier deployment: answers HTTP itself, so a query is one hop from ingress to batch.

An extra deployment hop cost ~3x throughput in measurements made before this project (issue #3). The model runs through a compiled
tf.function in a worker thread, batched by @serve.batch, never on the replica's event loop:
a blocked loop cannot answer the router's queue-length probes and the proxy then stalls.
"""


import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from ray import serve
from ray.util import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from online_learning.rate_limit import FeedbackLimiter
from online_learning.settings import LearnerSettings
from serve.feedback import check_token, client_key, feedback_json_schema, parse_feedback, token_ok
from serve.ingress import trusted_client_header
from serve.batcher import ModelBatcher
from serve.requests import (PREDICT_OPENAPI, ModelError, RequestError, dumps, error_body, error_response, json_response,
                            parse_predict, read_asgi_body, read_body, send_json)
from serve.settings import AppSettings, BatchSettings, parse_settings
from train.store_cache import redact

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="textserve",
    version="1",
    description="Text classification served by Ray Serve; every answer names the model version.",
    redirect_slashes=False,  # a slash redirect would echo the client's Host header back to it
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(RequestError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"))


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception):
    # A 500 is a bug, but even a bug answers the JSON error shape, never a plain-text trace.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(RequestError(500, "internal_error", f"internal error ({type(exc).__name__}); it is logged"))


def _route_path(scope) -> str:
    """The path below the app's route prefix, as Starlette's router matches it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class PredictFirst:
    """The replica's ASGI app: POST /v1/predict straight to the replica's lean handler, everything
    else (other routes, /docs, lifespan, errors) to the FastAPI app. FastAPI's routing, middleware
    and dependency solving cost ~3x our own handler per request (docs/SERVING.md, profile)."""

    def __init__(self, replica: "Classifier", app: FastAPI):
        self.replica, self.app = replica, app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and _route_path(scope) == "/v1/predict":
            await self.replica._predict_asgi(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def add_exception_handler(self, exc, handler) -> None:  # Serve installs its 503 handlers through this
        self.app.add_exception_handler(exc, handler)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Classifier:
    async def __init__(self, settings: dict, learner=None):
        self.settings: AppSettings = parse_settings(AppSettings, settings, "application args")
        self._learner = learner  # a handle to the OnlineLearner deployment, or None
        self._started_at = time.time()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(self.settings.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model = None  # a ServedModel once loaded; updates land in it on the model thread
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._batch_sizes = metrics.Histogram(
            "textserve_batch_size", "texts per model call",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self._version_gauge = metrics.Gauge("textserve_model_version", "model version served", tag_keys=("replica",))
        self._errors = metrics.Counter("textserve_request_errors", "rejected requests by code", tag_keys=("code",))
        self._last_batch_size = 0
        self._sync_error: str | None = None
        self._learner_info: dict | None = None  # what the learner serves, from its last reply
        self._fresh_at = time.time()  # when this replica last knew it held the learner's version
        self._staleness_gauge = metrics.Gauge("textserve_replica_staleness_s", "seconds since this replica last "
                                              "held the learner's current version", tag_keys=("replica",))
        self._client_header = trusted_client_header()  # set by our HAProxy, or None: use the peer
        limits = self.settings.learner or LearnerSettings()  # for /v1/model when there is no learner to ask
        self._local_limiter = FeedbackLimiter(limits.rate_limit_per_s, limits.rate_burst, limits.auth_fail_rate_per_s,
                                              limits.auth_fail_burst, limits.rate_limit_clients)
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._pool, self._try_load) and self._learner is not None:
            try:  # catch up with the learner before taking traffic
                await asyncio.wait_for(self._catch_up(), timeout=self.settings.learner.startup_sync_timeout_s)
            except Exception as err:  # learner down: serve the store's version rather than nothing
                self._sync_error = repr(err)
                logger.warning("started on v%s without the learner's current weights (%r)", self._model.version, err)
        self._poller = loop.create_task(self._follow())

    # -- model ---------------------------------------------------------------------------
    def _try_load(self) -> bool:
        from serve.runner import ServedModel
        from train.store import ModelStore

        store = ModelStore(self.settings.model_store)
        if store.latest() is None:
            return False
        self._install(ServedModel(store.load()))
        return True

    def _install(self, served) -> None:
        self._model = served
        self._version_gauge.set(served.version, tags={"replica": self._replica})
        logger.info("replica %s serves model version %s", self._replica, served.version)

    async def _follow(self) -> None:
        """Until a model exists, look in the store; then pull new versions from the learner."""
        if self._model is None:
            logger.warning("no model in %s yet; /healthz answers 503 until one is published", self.settings.model_store)
        while self._model is None:
            await asyncio.sleep(self.settings.model_poll_s)
            await asyncio.get_running_loop().run_in_executor(self._pool, self._try_load)
        while self._learner is not None:
            await asyncio.sleep(self.settings.learner.replica_poll_s)
            try:
                await self._sync_with_learner()
                self._sync_error = None
            except Exception as err:  # the learner restarting: keep serving what we have
                if self._sync_error is None:
                    logger.warning("cannot reach the learner (%r); serving v%s meanwhile", err, self._model.version)
                self._sync_error = repr(err)
            self._staleness_gauge.set(self._staleness_s(), tags={"replica": self._replica})

    async def _catch_up(self) -> None:
        """Sync until this replica is ready: on the learner's lineage, or holding every event the
        learner had judged when it began it (while it replays: its `ready_offset`)."""
        while True:
            try:
                await self._sync_with_learner()
                if self._learner_info is not None and self._readiness()[0]:
                    return
            except Exception as err:  # the learner still starting (a poll timed out): retry to the deadline
                logger.info("waiting for the learner: %r", err)
            await asyncio.sleep(self.settings.learner.replica_poll_s)

    def _model_for(self, info: dict, updates: list[dict]):
        """Full weights of another model than the one served (a retrain into another family or
        label set): load the lineage's base version from the store, then take the weights."""
        from serve.runner import ServedModel
        from train.store import ModelStore

        served = ServedModel(ModelStore(self.settings.model_store).load(info["base_version"]))
        served.apply(updates)
        return served

    async def _sync_with_learner(self) -> None:
        from serve.runner import DigestMismatch, ModelMismatch

        served = self._model
        # Bounded: a hung learner (stopped, deadlocked) must read as unreachable, not freeze the poller.
        reply = await asyncio.wait_for(self._learner.updates_since.remote(self._replica, served.poll_identity),
                                       timeout=max(5.0, 4 * self.settings.learner.replica_poll_s))
        info, kind = reply["learner"], reply["kind"]
        loop = asyncio.get_running_loop()
        try:
            if kind == "relabel":
                await loop.run_in_executor(self._pool, served.relabel, info)
            elif kind in ("deltas", "full"):
                updates = list(await asyncio.gather(*reply["refs"]))  # from this node's object store
                try:
                    await loop.run_in_executor(self._pool, served.apply, updates)
                except ModelMismatch as err:
                    logger.warning("replica %s: %s; loading v%s from the store", self._replica, err, info["base_version"])
                    served = await loop.run_in_executor(self._pool, self._model_for, info, updates)
                    self._install(served)  # swapped whole: a batch in flight finishes on the old model
        except DigestMismatch as err:  # nothing written; the next poll brings full weights
            logger.error("replica %s: %s", self._replica, err)
        self._learner_info = info
        if not info["published"] or served.identity == {k: info[k] for k in ("lineage", "version", "digest", "log_offset")}:
            self._fresh_at = time.time()
        self._version_gauge.set(served.version, tags={"replica": self._replica})

    def _staleness_s(self) -> float:
        return time.time() - self._fresh_at

    def _readiness(self) -> tuple[bool, str]:
        """(ready, why). Ready: a model, and the learner's current lineage (or, while it replays,
        every event it had acknowledged); without a reachable learner, whatever this replica has."""
        served, info = self._model, self._learner_info
        if served is None:
            return False, "no_model"
        if self._learner is None:
            return True, "ready"
        if self._sync_error is not None or info is None:
            return True, "learner_unreachable"
        if served.lineage == info.get("lineage") or served.log_offset >= info["ready_offset"]:
            return True, "ready"
        return False, "catching_up"

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_settings(BatchSettings, user_config, "Classifier user_config")
        self._classify.set_max_batch_size(cfg.max_batch_size)
        self._classify.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> PredictFirst:
        # Serve 2.60 calls this after __init__ and serves what it returns; self._asgi_app is the
        # FastAPI app @serve.ingress set up (its routes bound to this replica).
        return PredictFirst(self, self._asgi_app)

    async def check_health(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None and poller.done() and poller.exception() is not None:
            raise RuntimeError(f"model store polling failed: {poller.exception()!r}")
        limit = self.settings.learner.staleness_hard_limit_s if self.settings.learner else None
        # Only with a learner, and while it answers: if it is down, a new replica would be no
        # fresher (without one, nothing ever refreshes the clock: every replica would be replaced
        # 120 s after it started).
        if limit and self._learner is not None and self._sync_error is None and self._staleness_s() > limit:
            raise RuntimeError(f"{self._staleness_s():.0f} s behind the learner (hard limit {limit} s)")

    @functools.cached_property
    def _classify(self) -> ModelBatcher:
        """The micro-batcher (serve/batcher.py); batching settings come from user_config."""
        return ModelBatcher(self._run_batch)

    async def _run_batch(self, texts: list[str], top_ks: list[int]) -> list:
        # The model thread runs batches and updates one at a time: one version per batch. A text
        # the model fails on gets a ModelError; its neighbours in the batch get their answers.
        answers = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._model.classify_isolated, texts, top_ks)
        self._batch_sizes.observe(len(texts))
        self._last_batch_size = len(texts)
        return answers

    async def _answer(self, text: str, top_k: int) -> dict:
        answer = await self._classify.submit(text, top_k)
        if isinstance(answer, ModelError):
            logger.warning("model call failed for one text: %s", answer)
            raise RequestError(500, "model_error", "the model could not classify this text; the error is logged")
        return answer

    # -- HTTP ----------------------------------------------------------------------------
    def _reject(self, err: RequestError):
        self._errors.inc(tags={"code": err.code})
        return error_response(err)

    async def _predict_asgi(self, scope, receive, send) -> None:
        """POST /v1/predict without FastAPI: the same answers, codes and messages as `predict`."""
        try:
            texts, is_list, top_k = parse_predict(await read_asgi_body(scope, receive, self.settings.max_body_bytes),
                                                  self.settings)
            if self._model is None:
                raise RequestError(503, "no_model", "no model loaded yet; train one: python -m train", {"Retry-After": "5"})
            if not is_list:
                body = dumps(await self._answer(texts[0], top_k))
            else:
                answers = await asyncio.gather(*(self._answer(t, top_k) for t in texts))
                body = dumps({"predictions": answers, "model_version": min(a["model_version"] for a in answers)})
        except RequestError as err:
            self._errors.inc(tags={"code": err.code})
            return await send_json(send, err.status, error_body(err), err.headers)
        except Exception as exc:  # a bug: the JSON error shape, as FastAPI's handler answers it
            logger.exception("unhandled error on POST /v1/predict")
            err = RequestError(500, "internal_error", f"internal error ({type(exc).__name__}); it is logged")
            return await send_json(send, err.status, error_body(err))
        await send_json(send, 200, body)

    @api.post("/v1/predict", openapi_extra=PREDICT_OPENAPI,
              summary="Classify one text or a list; answers label, score, top-k and model_version")
    async def predict(self, request: Request):
        """Documents the route (OpenAPI); requests are answered by _predict_asgi (PredictFirst)."""
        try:
            texts, is_list, top_k = parse_predict(await read_body(request, self.settings.max_body_bytes), self.settings)
            if self._model is None:
                raise RequestError(503, "no_model", "no model loaded yet; train one: python -m train", {"Retry-After": "5"})
            if not is_list:
                return json_response(await self._answer(texts[0], top_k))
            answers = await asyncio.gather(*(self._answer(t, top_k) for t in texts))
        except RequestError as err:
            return self._reject(err)
        return json_response({"predictions": answers, "model_version": min(a["model_version"] for a in answers)})

    @api.post("/v1/feedback", status_code=202, openapi_extra=feedback_json_schema(),
              summary="Labelled feedback events; 202 once durable. Needs 'Authorization: Bearer <token>'")
    async def feedback(self, request: Request):
        cfg = self.settings.learner
        try:
            if cfg is None or self._learner is None:
                raise RequestError(404, "not_found", "online learning is off in this application's config")
            try:
                check_token(request.headers.get("authorization"), cfg.feedback_token_env)
                auth_error = None
            except RequestError as err:
                auth_error = err
            if auth_error is not None and auth_error.code == "feedback_disabled":
                raise auth_error  # no token configured: not a failed authentication
            await self._admit(request, auth_error is None)  # failed authentications spend too
            if auth_error is not None:
                raise auth_error
            if self._model is None:
                raise RequestError(503, "no_model", "no model loaded yet", {"Retry-After": "5"})
            if self._sync_error is not None:  # known down (polled every replica_poll_s): no 10 s wait
                raise RequestError(503, "learner_unavailable", "the learner is restarting; retry", {"Retry-After": "2"})
            body = await read_body(request, self.settings.max_body_bytes)
            events = parse_feedback(body, self.settings, cfg, self._model.label_set)
        except RequestError as err:
            return self._reject(err)
        try:
            reply = await asyncio.wait_for(self._learner.submit.remote(events), timeout=10)
        except Exception as err:  # learner restarting or unreachable: nothing was acknowledged
            logger.warning("feedback not accepted, learner unavailable: %r", err)
            return self._reject(RequestError(503, "learner_unavailable", "the learner is restarting; retry",
                                             {"Retry-After": "2"}))
        if "write_error" in reply:
            failed = reply["write_error"]
            return self._reject(RequestError(
                507, "log_write_failed", f"the feedback log could not be written ({failed['errno']}); nothing in this "
                "request was acknowledged; retry later", {"Retry-After": "30"}, detail={"errno": failed["errno"]}))
        if "conflict" in reply:
            clash = reply["conflict"]
            return self._reject(RequestError(
                409, "event_id_conflict", f"event_id {clash['event_id'][:200]!r} " + (
                    f"already names another event (offset {clash['offset']})" if clash["offset"] is not None
                    else "appears twice in this request") + " with a different text or label; nothing in this "
                "request was written. "
                "Use a new event_id for a new event", detail={"event_id": clash["event_id"]}))
        results = reply["results"]
        dups = sum(1 for _, dup in results if dup)
        return json_response({"accepted": len(results) - dups, "duplicates": dups,
                              "offsets": [off for off, _ in results]}, status=202)

    async def _admit(self, request: Request, auth_ok: bool) -> None:
        """The rate limit for feedback and failed authentications: app-wide, kept by the learner;
        without one (learner off or unreachable) this replica's own, so guessing the token stays slow."""
        client = client_key(request, self._client_header)
        if self._learner is None or self._sync_error is not None:  # off, or known down: no 5 s wait
            wait = self._local_limiter.admit(client, auth_ok)
        else:
            try:
                wait = await asyncio.wait_for(self._learner.admit.remote(client, auth_ok), timeout=5)
            except Exception as err:  # learner down: nothing can be accepted anyway
                raise RequestError(503, "learner_unavailable",
                                   f"the learner is not reachable ({type(err).__name__}); retry", {"Retry-After": "2"}) from err
        if wait:
            raise RequestError(429, "rate_limited", f"too many requests from {client}; retry in {wait} s",
                               {"Retry-After": str(wait)})

    @api.get("/v1/model", summary="Served versions; with the operator (feedback) token also replicas, learner, "
                                  "staleness and publish history")
    async def model_info(self, request: Request):
        served = self._model
        public = {"model_version": served.version if served else None,
                  "labels": served.loaded.labels if served else []}
        authorization = request.headers.get("authorization")
        if not token_ok(authorization, self.settings.operator_token_env):
            if authorization is not None:  # a wrong token: spends from the failed-auth budget
                try:
                    await self._admit(request, False)
                except RequestError as err:
                    return self._reject(err)
            return json_response(public)  # operator details (PIDs, paths, learner state) need the token
        batch = self._classify
        learner = None
        if self._learner is not None and self._sync_error is not None:  # known down: no 5 s wait
            learner = {"error": f"unreachable: {self._sync_error}"}
        elif self._learner is not None:
            try:
                learner = await asyncio.wait_for(self._learner.status.remote(), timeout=5)
            except Exception as err:  # report it; the replica's own part still answers
                learner = {"error": repr(err)}
        ready, why = self._readiness()
        return json_response({
            "learner": learner,
            "log_offset": served.log_offset if served else None,
            "lineage": served.lineage if served else None,
            "weights_digest": served.digest if served else None,
            "ready": ready, "readiness": why,
            "staleness_s": self._staleness_s() if self._learner is not None else None,
            "stale": self._learner is not None and self._staleness_s() > self.settings.learner.max_staleness_s,
            "learner_sync_error": self._sync_error,
            "replica": self._replica,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "model_version": served.version if served else None,
            "model_store": redact(self.settings.model_store),  # never credentials in an answer
            "size": served.loaded.size_name if served else None,
            "arch": served.loaded.arch if served else None,
            "char_ngrams": list(served.loaded.size.char_ngrams) if served else None,  # [] words alone
            "labels": served.loaded.labels if served else [],
            "metrics": served.loaded.metrics if served else {},
            "batching": {"max_batch_size": batch._get_max_batch_size(),
                         "batch_wait_timeout_s": batch._get_batch_wait_timeout_s(),
                         "last_batch_size": self._last_batch_size},
            "time": time.time(),
        })

    @api.api_route("/healthz", methods=["GET", "HEAD"],  # HEAD: load balancer probes
                   summary="200 once this replica serves the learner's current weights (or the store's newest "
                           "while the learner is unreachable, said in 'learner'); 503 before")
    async def healthz(self):
        ready, why = self._readiness()
        if why == "no_model":
            return error_response(RequestError(503, "no_model", "no model loaded yet", {"Retry-After": "5"}))
        if not ready:
            return error_response(RequestError(503, "catching_up", "loading the learner's current weights",
                                               {"Retry-After": "1"}))
        body = {"status": "ready", "model_version": self._model.version}
        if self._learner is not None:
            body["learner"] = "unreachable" if why == "learner_unreachable" else "in_sync"
            body["staleness_s"] = round(self._staleness_s(), 3)
        return json_response(body)
