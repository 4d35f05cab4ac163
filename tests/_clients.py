"""Clients for hostile-traffic tests: each bound to a loopback source address of its own, so the
ingress sees distinct client addresses (127.0.0.0/8 is all loopback on Linux). Traffic goes to
127.0.0.1 only, and every loop here is bounded in count and time."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from urllib.parse import urlsplit

from tests._helpers import FEEDBACK_TOKEN

AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


async def post_json(session, url: str, payload) -> tuple[int, bytes]:
    """POST `payload` as JSON with an aiohttp session: (status, body)."""
    async with session.post(url, data=json.dumps(payload), headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


def request_from(source: str, url: str, method: str = "GET", body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP request from `source` (a 127.x.y.z address): (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str | None:
    """The stable code of an error answer, or None when the body is not the JSON error shape."""
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def replica_pids(url: str, expected: int, tries: int = 60) -> set[int]:
    """PIDs of the replicas answering `url` (from the operator view of /v1/model)."""
    pids: set[int] = set()
    for _ in range(tries):
        status, _, body = request_from("127.0.0.1", f"{url}/v1/model", headers=AUTH)
        if status == 200:
            pids.add(json.loads(body)["pid"])
        if len(pids) >= expected:
            break
    return pids


async def stalled_connection(host: str, port: int, source: str, payload: bytes, hold_s: float,
                             sent: list | None = None) -> tuple[float, bytes]:
    """Send `payload` (an unfinished request) and wait: (seconds until the server closed, what it sent).
    `sent` gets one entry once the payload is out or the connection was refused.

    b"" with 0.0 means the connection was refused or reset at once."""
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        if sent is not None:
            sent.append(source)
        return 0.0, b""
    start = time.monotonic()
    try:
        writer.write(payload)
        try:
            await writer.drain()
        finally:  # sent, or cut while sending: either way this connection is in place or over
            if sent is not None:
                sent.append(source)
        data = await asyncio.wait_for(reader.read(), hold_s)
        return time.monotonic() - start, data
    except (OSError, asyncio.TimeoutError) as err:
        return time.monotonic() - start, repr(err).encode()
    finally:
        writer.close()
