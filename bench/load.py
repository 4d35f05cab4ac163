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


async def _request(session: aiohttp.ClientSession, url: str, text: str, since: float, result: StepResult) -> None:
    """One POST; its outcome is counted into `result`, latency measured from `since`."""
    try:
        async with session.post(url, json={"text": text}) as resp:
            body = await resp.read()
            result.bytes_received += len(body)
            result.statuses[resp.status] += 1
            if 200 <= resp.status < 300:
                result.latencies_s.append(time.perf_counter() - since)
    except asyncio.TimeoutError:
        result.timeouts += 1
    except aiohttp.ClientError:
        result.connection_errors += 1


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
                await _request(session, url, next(bodies), time.perf_counter(), result)

        await asyncio.gather(*(user() for _ in range(users)))
        result.duration_s = time.perf_counter() - start
    return result


def arrival_times(rate: float, duration_s: float, poisson: bool, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of a fixed-rate schedule: constant or Poisson."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t >= duration_s:
            return times
        times.append(t)


async def open_loop(url: str, rate: float, duration_s: float, texts: list[str], poisson: bool = True,
                    timeout_s: float = 30.0, max_in_flight: int = 2000, late_after_s: float = 0.01) -> StepResult:
    """Requests sent on a schedule whatever the answers do (no coordinated omission).

    Latency counts from the scheduled send time. A request whose slot comes while
    `max_in_flight` are outstanding is dropped (counted), one sent over `late_after_s` after its
    slot is counted late: both mean the client, not only the server, fell behind.
    """
    result = StepResult(users=0, duration_s=duration_s)
    result.offered_rate = rate
    bodies = itertools.cycle(texts)
    schedule = arrival_times(rate, duration_s, poisson)
    in_flight: set[asyncio.Task] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()

        for at in schedule:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > late_after_s:
                result.late += 1
            if len(in_flight) >= max_in_flight:
                result.dropped += 1
                continue
            task = asyncio.ensure_future(_request(session, url, next(bodies), start + at, result))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
        result.duration_s = max(duration_s, time.perf_counter() - start)
    return result
