"""Autoscaling and backpressure of the Serve application, observed through Serve's status API."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp

from tests._helpers import deploy, http_ok, wait_until


def running_replicas(app: str = "textserve") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "Classifier" not in status.deployments:
        return 0
    return status.deployments["Classifier"].replica_states.get("RUNNING", 0)


class BackgroundLoad:
    """Closed-loop load from `clients` aiohttp clients to 127.0.0.1, until stopped or `max_s` passes."""

    def __init__(self, url: str, clients: int, max_s: float):
        self.url, self.clients, self.max_s = url, clients, max_s
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        deadline = time.monotonic() + self.max_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async def client(i):
                while not self.stop.is_set() and time.monotonic() < deadline:
                    async with session.post(f"{self.url}/v1/predict", json={"text": f"turn on light {i}"}) as r:
                        await r.read()
                        self.statuses.append(r.status)
            await asyncio.gather(*(client(i) for i in range(self.clients)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self._thread.join(timeout=60)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(base_url):
    wait_until(lambda: running_replicas() == 1, timeout=120, what="back to 1 replica before the test")
    with BackgroundLoad(base_url, clients=32, max_s=150) as load:
        wait_until(lambda: running_replicas() == 2, timeout=120, what="scale-up to 2 replicas")
    assert load.statuses and set(load.statuses) == {200}
    wait_until(lambda: running_replicas() == 1, timeout=120, what="scale-down to 1 replica")


def test_overload_beyond_queue_limit_gets_503_not_a_hang(base_url, trained_store):
    from ray import serve

    # One replica that holds each batch open for 0.5 s, one request in flight, one queued.
    deploy(trained_store, name="overload", route_prefix="/overload", num_replicas=1,
           autoscaling_config=None, max_ongoing_requests=1, max_queued_requests=1,
           user_config={"max_batch_size": 64, "batch_wait_timeout_s": 0.5})
    url = f"{base_url}/overload"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"),
                   timeout=120, what="overload app ready")

        async def burst(n):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                async def one(i):
                    async with session.post(f"{url}/v1/predict", json={"text": f"lamp {i}"}) as r:
                        return r.status, r.headers.get("Retry-After"), await r.read()
                return await asyncio.gather(*(one(i) for i in range(n)))

        started = time.monotonic()
        results = asyncio.run(burst(30))
        elapsed = time.monotonic() - started
        statuses = [s for s, _, _ in results]
        assert statuses.count(503) >= 10, statuses
        assert statuses.count(200) >= 1, statuses
        assert all(retry for s, retry, _ in results if s == 503)  # clients are told when to retry
        assert elapsed < 15  # answered, not hung until the request timeout
    finally:
        serve.delete("overload")
