"""A tuned single process, no Ray: aiohttp + a micro-batcher + the compiled model in a thread.

python -m bench.baselines.tuned_single --store STORE [--version N] [--port 8002]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class MicroBatcher:
    """Collects requests for up to `wait_s` (or `max_batch`), then one model call for all."""

    def __init__(self, served, max_batch: int = 32, wait_s: float = 0.002):
        self.served, self.max_batch, self.wait_s = served, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            texts = [text for text, _ in items]
            try:
                answers = await loop.run_in_executor(self.pool, self.served.classify, texts, [1] * len(texts))
                for (_, fut), answer in zip(items, answers):
                    fut.set_result(answer)
            except Exception as err:  # a failed batch fails its requests, not the server
                for _, fut in items:
                    fut.set_exception(err)

    async def submit(self, text: str) -> dict:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((text, fut))
        return await fut


def make_app(store: str, version: int | None):
    import tensorflow as tf
    from aiohttp import web

    from serve.runner import ServedModel
    from train.store import ModelStore

    tf.config.threading.set_intra_op_parallelism_threads(1)
    served = ServedModel(ModelStore(store).load(version))
    batcher = MicroBatcher(served)

    async def predict(request):
        try:
            text = (await request.json()).get("text")
        except ValueError:
            text = None
        if not isinstance(text, str) or not text.strip():
            return web.json_response({"error": {"code": "empty_text", "message": "text is required"}}, status=422)
        answer = await batcher.submit(text)
        return web.json_response({k: answer[k] for k in ("label", "score", "model_version")})

    async def healthz(_request):
        return web.json_response({"status": "ready", "model_version": served.version})

    async def start_batcher(app):
        app["batcher"] = asyncio.get_running_loop().create_task(batcher.run())

    app = web.Application()
    app.add_routes([web.post("/v1/predict", predict), web.get("/healthz", healthz)])
    app.on_startup.append(start_batcher)
    return app


def main() -> None:
    from aiohttp import web

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--port", type=int, default=8002)
    a = p.parse_args()
    web.run_app(make_app(a.store, a.version), host="127.0.0.1", port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
