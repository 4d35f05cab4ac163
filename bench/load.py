"""The aiohttp load generator: closed loop (N users, each sends its next request on an answer)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import aiohttp

from bench.stats import StepResult


def bench_texts(seed: int = 0, limit: int = 2000) -> list[str]:
    """Request bodies from the bundled test split: real sentences of several lengths, two languages."""
    from train.data import DataSpec, load_dataset

    texts = [e.text for e in load_dataset(DataSpec(langs=("en", "ko"), seed=seed)).test]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


async def closed_loop(url: str, users: int, duration_s: float, texts: list[str],
                      keepalive: bool = True, timeout_s: float = 30.0) -> StepResult:
    """`users` concurrent clients for `duration_s`; only requests started in the window count."""
    result = StepResult(users=users, duration_s=duration_s)
    bodies = itertools.cycle(texts)
    connector = aiohttp.TCPConnector(limit=0, force_close=not keepalive)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def user():
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json={"text": next(bodies)}) as resp:
                        body = await resp.read()
                        result.bytes_received += len(body)
                        result.statuses[resp.status] += 1
                        if 200 <= resp.status < 300:
                            result.latencies_s.append(time.perf_counter() - t0)
                except asyncio.TimeoutError:
                    result.timeouts += 1
                except aiohttp.ClientError:
                    result.connection_errors += 1

        await asyncio.gather(*(user() for _ in range(users)))
        result.duration_s = time.perf_counter() - start
    return result
