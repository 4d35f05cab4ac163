"""The Classifier deployment: answers HTTP itself, so a query is one hop from ingress to batch.

Every extra deployment hop cost ~3x throughput here. The model runs through a compiled
tf.function in a worker thread, batched by @serve.batch, never on the replica's event loop:
a blocked loop cannot answer the router's queue-length probes and the proxy then stalls.
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

from serve.requests import PREDICT_OPENAPI, RequestError, error_response, json_response, parse_predict
from serve.settings import AppSettings, BatchSettings, parse_settings

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="textserve",
    version="1",
    description="Text classification served by Ray Serve; every answer names the model version.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(RequestError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"))


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Classifier:
    def __init__(self, settings: dict):
        self.settings: AppSettings = parse_settings(AppSettings, settings, "application args")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(self.settings.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model = None  # a ServedModel; replaced whole, never changed in place
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._batch_sizes = metrics.Histogram(
            "textserve_batch_size", "texts per model call",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self._version_gauge = metrics.Gauge("textserve_model_version", "model version served", tag_keys=("replica",))
        self._errors = metrics.Counter("textserve_request_errors", "rejected requests by code", tag_keys=("code",))
        self._last_batch_size = 0
        if not self._try_load():
            self._poller = asyncio.get_event_loop().create_task(self._poll_store())

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

    async def _poll_store(self) -> None:
        logger.warning("no model in %s yet; /healthz answers 503 until one is published", self.settings.model_store)
        while self._model is None:
            await asyncio.sleep(self.settings.model_poll_s)
            await asyncio.get_running_loop().run_in_executor(self._pool, self._try_load)

    def reconfigure(self, user_config: dict) -> None:
        cfg = parse_settings(BatchSettings, user_config, "Classifier user_config")
        self._classify.set_max_batch_size(cfg.max_batch_size)
        self._classify.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def check_health(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None and poller.done() and poller.exception() is not None:
            raise RuntimeError(f"model store polling failed: {poller.exception()!r}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _classify(self, texts: list[str], top_ks: list[int]) -> list[dict]:
        served = self._model  # one version for the whole batch: swaps happen between batches
        answers = await asyncio.get_running_loop().run_in_executor(self._pool, served.classify, texts, top_ks)
        self._batch_sizes.observe(len(texts))
        self._last_batch_size = len(texts)
        for answer in answers:
            answer["model_version"] = served.version
            answer["batch_size"] = len(texts)
        return answers

    # -- HTTP ----------------------------------------------------------------------------
    def _reject(self, err: RequestError):
        self._errors.inc(tags={"code": err.code})
        return error_response(err)

    @api.post("/v1/predict", openapi_extra=PREDICT_OPENAPI,
              summary="Classify one text or a list; answers label, score, top-k and model_version")
    async def predict(self, request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return self._reject(RequestError(413, "body_too_large",
                                             f"request body is {declared} bytes; the limit is {self.settings.max_body_bytes}"))
        try:
            texts, is_list, top_k = parse_predict(await request.body(), self.settings)
        except RequestError as err:
            return self._reject(err)
        if self._model is None:
            return self._reject(RequestError(503, "no_model", "no model loaded yet; train one: python -m train",
                                             {"Retry-After": "5"}))
        if not is_list:
            return json_response(await self._classify(texts[0], top_k))
        answers = await asyncio.gather(*(self._classify(t, top_k) for t in texts))
        return json_response({"predictions": answers, "model_version": min(a["model_version"] for a in answers)})

    @api.get("/v1/model", summary="The model version this replica serves, its labels and metrics")
    async def model_info(self):
        served = self._model
        batch = self._classify
        return json_response({
            "replica": self._replica,
            "pid": os.getpid(),
            "model_version": served.version if served else None,
            "model_store": self.settings.model_store,
            "size": served.loaded.size_name if served else None,
            "labels": served.loaded.labels if served else [],
            "metrics": served.loaded.metrics if served else {},
            "batching": {"max_batch_size": batch._get_max_batch_size(),
                         "batch_wait_timeout_s": batch._get_batch_wait_timeout_s(),
                         "last_batch_size": self._last_batch_size},
            "time": time.time(),
        })

    @api.get("/healthz", summary="200 once a model is loaded, 503 before")
    async def healthz(self):
        if self._model is None:
            return error_response(RequestError(503, "no_model", "no model loaded yet", {"Retry-After": "5"}))
        return json_response({"status": "ready", "model_version": self._model.version})
