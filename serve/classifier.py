"""The Classifier deployment: HTTP only. It answers HTTP itself, so a query is one hop from
ingress to batch (an extra deployment hop costs throughput: docs/SERVING.md).

The model and everything about following the learner live in serve/model_follower.py; texts reach
the model through the micro-batcher (serve/batcher.py). The model runs on the replica's model
thread, never on its event loop: a blocked loop cannot answer the router's queue-length probes and
the proxy then stalls.
"""


import asyncio
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
from serve.batcher import ModelBatcher
from serve.feedback import (LEARNER_RETRY_AFTER, authorization_of, check_token, client_key, feedback_json_schema,
                            parse_feedback, submit_answer, submit_through_handover, token_ok)
from serve.ingress import trusted_client_header
from serve.model_follower import ModelFollower
from serve.requests import (PREDICT_OPENAPI, ModelError, RequestError, dumps, error_body, error_response, json_response,
                            parse_predict, read_asgi_body, read_body, send_json)
from serve.settings import AppSettings, BatchSettings, parse_settings
from train.store_cache import redact

logger = logging.getLogger("ray.serve")

# Calls to the learner on a request's path wait at most this long; past it the learner counts as
# unavailable (503 with Retry-After) rather than holding the client (a submit: serve/feedback.py).
ADMIT_TIMEOUT_S = 5.0
STATUS_TIMEOUT_S = 5.0
# Retry-After while no model is loaded: a replica without one looks in the store every model_poll_s.
NO_MODEL_RETRY_AFTER = {"Retry-After": "5"}

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
    and dependency solving cost several times our own handler per request (docs/SERVING.md,
    "The predict path")."""

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
        replica = serve.get_replica_context().replica_id.unique_id
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._follower = ModelFollower(self.settings, learner, replica, pool)
        batch_sizes = metrics.Histogram("textserve_batch_size", "texts per model call",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        # user_config (reconfigure) sets the batch limits; until then, BatchSettings' defaults
        self._batcher = ModelBatcher(self._follower.classify, on_batch=batch_sizes.observe)
        self._errors = metrics.Counter("textserve_request_errors", "rejected requests by code", tag_keys=("code",))
        self._client_header = trusted_client_header()  # set by our HAProxy, or None: use the peer
        limits = self.settings.learner or LearnerSettings()  # for /v1/model when there is no learner to ask
        self._local_limiter = FeedbackLimiter(limits.rate_limit_per_s, limits.rate_burst, limits.auth_fail_rate_per_s,
                                              limits.auth_fail_burst, limits.rate_limit_clients)
        await self._follower.start()

    def reconfigure(self, user_config: dict) -> None:
        self._batcher.configure(parse_settings(BatchSettings, user_config, "Classifier user_config"))

    def __serve_build_asgi_app__(self) -> PredictFirst:
        # Serve 2.60 calls this after __init__ and serves what it returns; self._asgi_app is the
        # FastAPI app @serve.ingress set up (its routes bound to this replica).
        return PredictFirst(self, self._asgi_app)

    async def __del__(self):
        if hasattr(self, "_follower"):  # not when __init__ failed before it
            await self._follower.stop()

    async def check_health(self) -> None:
        problem = self._follower.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    async def _answer(self, text: str, top_k: int) -> dict:
        answer = await self._batcher.submit(text, top_k)
        if isinstance(answer, ModelError):
            logger.warning("model call failed for one text: %s", answer)
            raise RequestError(500, "model_error", "the model could not classify this text; the error is logged")
        return answer

    # -- HTTP ----------------------------------------------------------------------------
    def _reject(self, err: RequestError):
        self._errors.inc(tags={"code": err.code})
        return error_response(err)

    async def _predict_asgi(self, scope, receive, send) -> None:
        """POST /v1/predict without FastAPI (PredictFirst routes it here): FastAPI's error shapes,
        codes and messages, at a fraction of its cost per request."""
        try:
            texts, is_list, top_k = parse_predict(await read_asgi_body(scope, receive, self.settings.max_body_bytes),
                                                  self.settings)
            if self._follower.model is None:
                raise RequestError(503, "no_model", "no model loaded yet; train one: python -m train", NO_MODEL_RETRY_AFTER)
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
        # PredictFirst hands every POST /v1/predict to _predict_asgi before FastAPI routes it (its
        # path test is Starlette's), so this body never runs; were it reached, the app's error
        # handler would answer 500 internal_error, never a second copy of the predict path.
        raise RuntimeError("POST /v1/predict reached FastAPI; PredictFirst should have answered it")

    @api.post("/v1/feedback", status_code=202, openapi_extra=feedback_json_schema(),
              summary="Labelled feedback events; 202 once durable. Needs 'Authorization: Bearer <token>'")
    async def feedback(self, request: Request):
        cfg = self.settings.learner
        try:
            if cfg is None or self._learner is None:
                raise RequestError(404, "not_found", "online learning is off in this application's config")
            authorization = authorization_of(request)  # two headers: 400 before anything is spent
            try:
                check_token(authorization, cfg.feedback_token_env)
                auth_error = None
            except RequestError as err:
                auth_error = err
            if auth_error is not None and auth_error.code == "feedback_disabled":
                raise auth_error  # no token configured: not a failed authentication
            await self._admit(request, auth_error is None)  # failed authentications spend too
            if auth_error is not None:
                raise auth_error
            served = self._follower.model
            if served is None:
                raise RequestError(503, "no_model", "no model loaded yet", NO_MODEL_RETRY_AFTER)
            body = await read_body(request, self.settings.max_body_bytes)
            events = parse_feedback(body, self.settings, cfg, served.label_set)
        except RequestError as err:
            return self._reject(err)
        try:
            return json_response(submit_answer(
                await submit_through_handover(self._learner, events, self._follower.sync_error)), status=202)
        except RequestError as err:  # refused by the learner, or none reachable: nothing was acknowledged
            return self._reject(err)

    async def _admit(self, request: Request, auth_ok: bool) -> None:
        """The rate limit for feedback and failed authentications: app-wide, kept by the learner;
        without one (learner off or unreachable) this replica's own, so guessing the token stays slow."""
        client = client_key(request, self._client_header)
        if self._learner is None or self._follower.sync_error is not None:  # off, or known down: no admit wait
            wait = self._local_limiter.admit(client, auth_ok)
        else:
            try:
                wait = await asyncio.wait_for(self._learner.admit.remote(client, auth_ok), timeout=ADMIT_TIMEOUT_S)
            except Exception as err:  # learner down: nothing can be accepted anyway
                raise RequestError(503, "learner_unavailable",
                                   f"the learner is not reachable ({type(err).__name__}); retry", LEARNER_RETRY_AFTER) from err
        if wait:
            raise RequestError(429, "rate_limited", f"too many requests from {client}; retry in {wait} s",
                               {"Retry-After": str(wait)})

    @api.get("/v1/model", summary="Served versions; with the operator (feedback) token also replicas, learner, "
                                  "staleness and publish history")
    async def model_info(self, request: Request):
        follower = self._follower
        served = follower.model
        public = {"model_version": served.version if served else None,
                  "labels": served.loaded.labels if served else []}
        try:
            authorization = authorization_of(request)
        except RequestError as err:
            return self._reject(err)
        if not token_ok(authorization, self.settings.operator_token_env):
            if authorization is not None:  # a wrong token: spends from the failed-auth budget
                try:
                    await self._admit(request, False)
                except RequestError as err:
                    return self._reject(err)
            return json_response(public)  # operator details (PIDs, paths, learner state) need the token
        batch = self._batcher
        learner = None
        if self._learner is not None and follower.sync_error is not None:  # known down: no status wait
            learner = {"error": f"unreachable: {follower.sync_error}"}
        elif self._learner is not None:
            try:
                status = await asyncio.wait_for(self._learner.status.remote(), timeout=STATUS_TIMEOUT_S)
                learner = status.as_json()
            except Exception as err:  # report it; the replica's own part still answers
                learner = {"error": repr(err)}
        ready, why = follower.readiness()
        return json_response({
            "learner": learner,
            "log_offset": served.log_offset if served else None,
            "lineage": served.lineage if served else None,
            "weights_digest": served.digest if served else None,
            "ready": ready, "readiness": why,
            "staleness_s": follower.staleness_s() if self._learner is not None else None,
            "stale": self._learner is not None and follower.staleness_s() > self.settings.learner.max_staleness_s,
            "learner_sync_error": follower.sync_error,
            "replica": follower.replica,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "model_version": served.version if served else None,
            "model_store": redact(self.settings.model_store),  # never credentials in an answer
            "size": served.loaded.size_name if served else None,
            "arch": served.loaded.arch if served else None,
            "char_ngrams": list(served.loaded.size.char_ngrams) if served else None,  # [] words alone
            "subword_mix": (served.loaded.size.subword_mix if served.loaded.size.char_ngrams else None) if served else None,
            "labels": served.loaded.labels if served else [],
            "metrics": served.loaded.metrics if served else {},
            "batching": {"max_batch_size": batch.max_batch_size,
                         "batch_wait_timeout_s": batch.batch_wait_timeout_s,
                         "last_batch_size": batch.last_batch_size},
            "time": time.time(),
        })

    @api.api_route("/healthz", methods=["GET", "HEAD"],  # HEAD: load balancer probes
                   summary="200 once this replica has a model on the learner's current lineage, or one holding "
                           "every event the learner had judged (its ready_offset); with the learner unreachable, "
                           "once it has a model (said in 'learner'); once ready, it stays ready while it syncs to a newer "
                           "lineage ('syncing'); 503 before")
    async def healthz(self):
        ready, why = self._follower.readiness()
        if why == "no_model":
            return error_response(RequestError(503, "no_model", "no model loaded yet", NO_MODEL_RETRY_AFTER))
        if not ready:
            return error_response(RequestError(503, "catching_up", "loading the learner's current weights",
                                               {"Retry-After": "1"}))
        body = {"status": "ready", "model_version": self._follower.model.version}
        if self._learner is not None:
            body["learner"] = {"learner_unreachable": "unreachable", "syncing": "syncing"}.get(why, "in_sync")
            body["staleness_s"] = round(self._follower.staleness_s(), 3)
        return json_response(body)
