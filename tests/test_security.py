"""Hostile and unlucky traffic, one test per way it used to hurt other clients (docs/SECURITY.md).

Real Ray + Serve behind the hardened HAProxy ingress, real sockets on 127.0.0.1; attackers use
their own loopback source addresses (127.0.0.2...) so the ingress sees them as other clients.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import psutil
import pytest

from serve.haproxy_cleanup import haproxy_pids
from tests._clients import AUTH, error_code, post_json, replica_pids, request_from

GOOD = "turn on the kitchen light"
POISON = ["\ud800", "!!!???", "\u00a0\u200b", "\u0000"]  # lone surrogate; three texts with no tokens


def test_poisoned_texts_in_a_concurrent_load_hurt_no_one_else(hostile_app):
    """Row 1 + 9: bad texts mixed into batches; every good request is answered, and right."""
    async def rounds():
        out = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                         connector=aiohttp.TCPConnector(limit=0)) as s:
            for r in range(10):
                payloads = [{"text": GOOD} for _ in range(40)] + [{"text": POISON[r % len(POISON)]}]
                out += zip(payloads, await asyncio.gather(*(post_json(s, f"{hostile_app}/v1/predict", p)
                                                            for p in payloads)))
        return out

    good = bad = 0
    for payload, (status, body) in asyncio.run(rounds()):
        if payload["text"] in POISON:
            bad += 1
            assert status == 422 and error_code(body) in ("invalid_text", "empty_text"), (payload, status, body)
        else:
            good += 1
            assert status == 200 and json.loads(body)["label"] == "HassTurnOn", (payload, status, body)
    assert (good, bad) == (400, 10)


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback"])
@pytest.mark.parametrize("body, code", [
    (b"[" * 20_000 + b"]" * 20_000, "json_too_deep"),
    (b'{"text": "hi", "top_k": ' + b"9" * 5000 + b"}", "number_too_large"),
    (b'{"text": "hi", "top_k": NaN}', "malformed_json"),
], ids=["deep", "huge_int", "nan"])
def test_hostile_json_gets_400_with_a_code(hostile_app, path, body, code):
    """Row 7: a 20,000-deep body or a 5,000-digit number is a 400 JSON error, not a 500; so is
    NaN, which is not JSON though Python's parser reads it."""
    status, _, answer = request_from("127.0.0.1", hostile_app + path, "POST", body, AUTH)
    assert (status, error_code(answer)) == (400, code), answer[:200]
    assert request_from("127.0.0.1", f"{hostile_app}/v1/predict", "POST", json.dumps({"text": GOOD}).encode())[0] == 200


def test_texts_the_model_cannot_read_get_422(hostile_app):
    """Row 9 + a lone surrogate in feedback: 422 with a code, nothing written to the log."""
    for text in POISON:
        status, _, body = request_from("127.0.0.1", f"{hostile_app}/v1/predict", "POST",
                                       json.dumps({"texts": [GOOD, text]}).encode())
        assert status == 422 and error_code(body) in ("invalid_text", "empty_text"), (text, body)
    event = {"event_id": "surrogate-1", "text": "\ud800", "label": "HassTurnOn"}
    status, _, body = request_from("127.0.0.1", f"{hostile_app}/v1/feedback", "POST", json.dumps(event).encode(), AUTH)
    assert (status, error_code(body)) == (422, "invalid_text"), body


def _rss(pids) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


def test_chunked_uploads_are_cut_at_the_limit_and_memory_stays_flat(hostile_app):
    """Row 2: 4 clients each push 400 MB chunked; every replica stays within 100 MB of idle."""
    pids = replica_pids(hostile_app, expected=2)
    idle = _rss(pids)
    peak = dict(idle)
    chunk = b"x" * (1 << 20)

    async def upload():
        async def body():
            for _ in range(400):
                yield chunk
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                async with s.post(f"{hostile_app}/v1/predict", data=body(),
                                  headers={"Content-Type": "application/json"}) as r:
                    return r.status, error_code(await r.read())
        except aiohttp.ClientError as err:  # the server may close while we still send
            return type(err).__name__, None

    async def main():
        tasks = [asyncio.create_task(upload()) for _ in range(4)]
        while not all(t.done() for t in tasks):
            for pid, rss in _rss(pids).items():
                peak[pid] = max(peak[pid], rss)
            await asyncio.sleep(0.1)
        return [t.result() for t in tasks]

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 60
    # Each upload gets its 413, or is cut while still sending (the server closed after answering).
    assert all(r == (413, "body_too_large") or (isinstance(r[0], str) and r[1] is None) for r in results), results
    assert any(r == (413, "body_too_large") for r in results), results
    grew = {pid: (peak[pid] - idle[pid]) / 2**20 for pid in pids}
    assert max(grew.values()) < 100, f"replica RSS grew by {grew} MB"


async def _feedback_burst(url: str, source: str, n: int, headers) -> tuple[Counter, float]:
    """`n` feedback requests at once from `source`, each with `headers(i)`: (statuses, seconds)."""
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                     connector=aiohttp.TCPConnector(limit=0, local_addr=(source, 0))) as s:
        async def one(i):
            event = {"event_id": f"{source}-{i}-{time.time()}", "text": GOOD, "label": "HassTurnOn"}
            async with s.post(f"{url}/v1/feedback", json=event, headers=headers(i)) as r:
                await r.read()
                return r.status
        statuses = Counter(await asyncio.gather(*(one(i) for i in range(n))))
    return statuses, time.monotonic() - started


def _forged(i: int) -> dict:
    return {**AUTH, "X-Forwarded-For": f"198.51.100.{i % 250}", "X-Textserve-Client": f"192.0.2.{i % 250}",
            "X-Textserve-Ingress": "guessed-secret"}


def test_rate_limit_ignores_client_headers_and_is_app_wide(hostile_app):
    """Row 6: forged X-Forwarded-For / X-Textserve-Client do not mint new budgets, the budget is
    one for the app (2 replicas here, 20/s burst 30), and wrong tokens are limited too."""
    outcomes, elapsed = asyncio.run(_feedback_burst(hostile_app, "127.0.0.8", 120, _forged))
    assert outcomes[202] <= 30 + 20 * elapsed + 2 and outcomes[429] > 0, (outcomes, elapsed)  # one budget, not 2
    wrong = Counter()
    for i in range(40):
        status, headers, _ = request_from("127.0.0.9", f"{hostile_app}/v1/feedback", "POST", b"{}",
                                          {"Authorization": f"Bearer guess-{i}"})
        wrong[status] += 1
        if status == 429:
            assert int(headers["retry-after"]) >= 1
    assert wrong[429] >= 40 - 10 - 2 and wrong[403] <= 12, wrong  # 10 failures at once, then 0.2/s
    status, _, _ = request_from("127.0.0.9", f"{hostile_app}/v1/model", headers={"Authorization": "Bearer guess"})
    assert status == 429  # guessing through /v1/model spends from the same failed-auth budget
    status, _, _ = request_from("127.0.0.10", f"{hostile_app}/v1/feedback", "POST",
                                json.dumps({"event_id": "other-client", "text": GOOD, "label": "HassTurnOn"}).encode(), AUTH)
    assert status == 202  # another client has its own budget


def test_client_header_is_not_trusted_around_the_ingress(hostile_app):
    """A client that reaches a replica's own port directly cannot pick its identity either:
    without the ingress's secret the peer address is the key."""
    replica = next(iter(_hardened_servers("hostile")))
    # From 127.0.0.1, the address the replicas' HTTP server would trust X-Forwarded-For from.
    outcomes, elapsed = asyncio.run(_feedback_burst(f"http://127.0.0.1:{replica}/hostile", "127.0.0.1", 120, _forged))
    assert outcomes[202] <= 30 + 20 * elapsed + 2 and outcomes[429] > 0, (outcomes, elapsed)


def test_protocol_tricks_get_json_errors_at_the_ingress(hostile_app):
    """What the replicas' HTTP server would answer in plain text is answered by the ingress in JSON,
    HTTP/2 without TLS cannot multiplex past the per-client cap, and no redirect echoes Host."""
    import socket

    url = f"{hostile_app}/v1/predict"
    for method, target, headers, status, code in [
        ("FOO", url, {}, 405, "method_not_allowed"),
        ("GET", f"{hostile_app}/{'a' * 9000}", {}, 414, "uri_too_long"),
        ("POST", url + "/", {"Host": "evil.example"}, 404, "not_found"),
    ]:
        got, answer_headers, body = request_from("127.0.0.1", target, method,
                                                 None if method == "GET" else b'{"text": "hi"}', headers)
        assert (got, error_code(body)) == (status, code), (method, target[:80], got, body[:200])
        assert "location" not in answer_headers
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    got, _, body = request_from("127.0.0.1", f"{hostile_app}/v1/model", "GET", None, upgrade)
    assert (got, error_code(body)) == (400, "bad_request"), body  # refused at the ingress, in JSON
    host, port = urlsplit(hostile_app).hostname, urlsplit(hostile_app).port
    with socket.create_connection((host, port), timeout=10) as conn:  # HTTP/2 prior knowledge
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = conn.recv(200)
    assert not answer.startswith(b"\x00") and (answer == b"" or answer.startswith(b"HTTP/1.1 400")), answer


def test_model_details_need_the_operator_token(hostile_app):
    """Row 10: without a token /v1/model shows versions and labels only. From an address of its own:
    a wrong token spends from the client's budgets, which the tests before may have emptied for
    127.0.0.1 (then the answer is a 429, seconds earlier or later)."""
    client = "127.0.0.11"
    status, _, body = request_from(client, f"{hostile_app}/v1/model")
    assert status == 200 and set(json.loads(body)) == {"model_version", "labels"}
    status, _, body = request_from(client, f"{hostile_app}/v1/model", headers={"Authorization": "Bearer nope"})
    assert status == 200 and set(json.loads(body)) == {"model_version", "labels"}
    status, _, body = request_from(client, f"{hostile_app}/v1/model", headers=AUTH)
    details = json.loads(body)
    assert {"pid", "learner", "model_store"} <= set(details) and details["learner"]["version"] >= 1


def _hardened_servers(app: str | None = None) -> set[int]:
    """Ports of the servers (replicas; Serve's proxy where Ray adds it) HAProxy routes to, for
    one app's backend or all, read from the running (hardened) config."""
    import re

    run_dir = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    config = "\n".join(p.read_text() for p in run_dir.glob("*/haproxy.cfg"))
    assert "textserve-hardened" in config
    ports, backend = set(), None
    for line in config.splitlines():
        if line and not line[0].isspace():
            backend = line.split()[1] if line.startswith("backend ") else None
        match = re.match(r"\s+server \S+ [\d.]+:(\d+)", line)
        if match and backend and (app is None or backend == f"http-{app}"):
            ports.add(int(match.group(1)))
    assert ports, config[-2000:]
    return ports


def test_nothing_of_the_app_listens_beyond_loopback(hostile_app):
    """Row 8: HAProxy (HTTP, stats, Prometheus) and the replicas' HTTP ports on 127.0.0.1 only;
    HAProxy's admin socket 0600 in a 0700 folder. (Ray's own token-authenticated gRPC ports
    listen on all addresses: docs/SECURITY.md says how to firewall them.)"""
    run_dir = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    replica_ports = _hardened_servers()  # replicas' HTTP ports and Serve's own proxy
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                 and (c.pid in haproxy_pids() or c.laddr.port in replica_ports)]
    assert len({c.laddr.port for c in listening}) >= 3 + len(replica_ports), listening  # HTTP, stats, metrics
    exposed = [c for c in listening if not ipaddress.ip_address(c.laddr.ip).is_loopback]
    assert not exposed, exposed
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    sockets = list(run_dir.glob("*/admin.sock"))
    assert sockets and all(stat.S_IMODE(s.stat().st_mode) == 0o600 for s in sockets)


def test_hardened_ingress_folder_is_removed_on_exit(tmp_path):
    from serve.ingress import HardenedIngress

    with HardenedIngress() as env:
        run_dir = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
        assert run_dir.is_dir() and os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert not run_dir.exists()


def test_a_text_the_model_fails_on_fails_alone(trained_store):
    """Batch isolation behind validation: if the model call still fails on one text of a batch,
    its neighbours get their answers and it gets a ModelError (-> 500 model_error) of its own."""
    import tensorflow as tf

    from serve.requests import ModelError
    from serve.runner import ServedModel
    from train.store import ModelStore

    served = ServedModel(ModelStore(trained_store).load())
    model_fn = served._fn

    def failing_on_marker(texts):
        if b"MARKER" in texts.numpy():
            raise tf.errors.InvalidArgumentError(None, None, "a text the model cannot take")
        return model_fn(texts)

    served._fn = failing_on_marker
    answers = served.classify_isolated([GOOD, "MARKER", "turn off the fan"], [1, 1, 1])
    assert answers[0]["label"] == "HassTurnOn" and answers[2]["label"] == "HassTurnOff"
    assert isinstance(answers[1], ModelError)
    assert served.classify_isolated(["MARKER"], [1])[0].__class__ is ModelError


DUPLICATES = [  # (body, the key named): last-wins parsing would read a value a proxy in front did not
    (b'{"text": "turn on the light", "text": "stop the fan"}', "text"),
    (b'{"te\\u0078t": "turn on the light", "text": "stop the fan"}', "text"),  # one key, two spellings
    (b'{"texts": ["turn on the light"], "top_k": 1, "top_k": 3}', "top_k"),
    (b'{"event_id": "dup-1", "text": "turn on the light", "label": "HassTurnOn", "label": "HassTurnOff"}', "label"),
    (b'[{"event_id": "dup-2", "text": "hi there", "label": "HassTurnOn"}, {"a": {"b": 1, "b": 2}}]', "b"),
]


def test_parser_refuses_a_key_twice_at_any_depth_and_keeps_the_rest():
    """Ray-free: predict (orjson, then json for what it cannot prove unique) and feedback (json)
    refuse any object naming a key twice, with 400 duplicate_key naming it; bodies without one,
    including texts with ':' in them (the re-parse path), read as before."""
    from types import SimpleNamespace

    from online_learning.protocol import FeedbackEvent
    from serve.feedback import parse_feedback
    from serve.requests import RequestError, error_body, parse_predict

    limits = SimpleNamespace(max_body_bytes=65_536, max_texts=64, max_text_chars=2_000, top_k=3)
    learner, labels = SimpleNamespace(max_events=256), {"HassTurnOn", "HassTurnOff"}
    for body, key in DUPLICATES + [(b'{"\\ud800": 1, "\\ud800": 2}', "\\ud800"),
                                   (b'{"text": "a", "texts": [{"x": [1, {"y": 1, "y": 1}]}]}', "y")]:
        for parse in (lambda b: parse_predict(b, limits), lambda b: parse_feedback(b, limits, learner, labels)):
            with pytest.raises(RequestError) as err:
                parse(body)
            answer = json.loads(error_body(err.value))["error"]  # serialisable, even a lone surrogate
            assert (err.value.status, answer["code"], answer["key"]) == (400, "duplicate_key", key), body
            assert repr(key) in answer["message"], answer
    assert parse_predict(b'{"text": "wake me at 7:30", "top_k": 2}', limits) == (["wake me at 7:30"], False, 2)
    assert parse_predict(b'{"texts": ["a:b", "c"]}', limits) == (["a:b", "c"], True, 3)
    assert parse_feedback(b'{"event_id": "x:1", "text": "turn on: the light", "label": "HassTurnOn"}',
                          limits, learner, labels) == [FeedbackEvent("x:1", "turn on: the light", "HassTurnOn")]


def test_parser_refuses_nan_and_infinity_as_malformed_json():
    """Ray-free: NaN, Infinity and -Infinity are not JSON (RFC 8259), and 1e999 would read as
    infinity; both routes' parsers answer 400 malformed_json naming it, as for any other body that
    is not JSON."""
    from types import SimpleNamespace

    from serve.feedback import parse_feedback
    from serve.requests import RequestError, parse_predict

    limits = SimpleNamespace(max_body_bytes=65_536, max_texts=64, max_text_chars=2_000, top_k=3)
    learner, labels = SimpleNamespace(max_events=256), {"HassTurnOn"}
    for word in ("NaN", "Infinity", "-Infinity", "1e999", "-1e400"):  # the last two would read as infinity
        for body, parse in [(f'{{"text": "hi", "top_k": {word}}}', lambda b: parse_predict(b, limits)),
                            (f'{{"event_id": "a", "text": "hi", "label": {word}}}',
                             lambda b: parse_feedback(b, limits, learner, labels))]:
            with pytest.raises(RequestError) as err:
                parse(body.encode())
            assert (err.value.status, err.value.code) == (400, "malformed_json") and word in str(err.value), body
    assert parse_predict(b'{"text": "hi", "top_k": 2}', limits)[2] == 2  # finite numbers read as before


def test_two_authorization_headers_get_400_and_nothing_is_logged(hostile_app):
    """Through the ingress: a request with two Authorization headers is a 400 duplicate_header on
    both routes that read one, whichever comes first (a proxy in front may check the other one
    than the app would), and no event of such a feedback was written: the same id is new after."""
    import http.client

    parts = urlsplit(hostile_app)
    good, wrong = AUTH["Authorization"], "Bearer not-the-token"

    def send(method: str, route: str, authorizations: list[str], body: bytes = b"") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=("127.0.0.14", 0))
        try:
            conn.putrequest(method, parts.path + route)
            conn.putheader("Content-Type", "application/json")
            for value in authorizations:  # one header line each
                conn.putheader("Authorization", value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    event = json.dumps({"event_id": "twice-1", "text": GOOD, "label": "HassTurnOn"}).encode()
    for method, route, body in [("POST", "/v1/feedback", event), ("GET", "/v1/model", b"")]:
        for pair in ([good, wrong], [wrong, good], [good, good]):
            status, answer = send(method, route, pair, body)
            assert (status, error_code(answer)) == (400, "duplicate_header"), (route, pair, status, answer[:300])
    status, answer = send("POST", "/v1/feedback", [good], event)
    assert status == 202 and json.loads(answer)["accepted"] == 1, answer  # the id was never taken
    status, answer = send("GET", "/v1/model", [good])
    assert status == 200 and "learner" in json.loads(answer), answer[:300]


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback"])
def test_a_key_twice_gets_400_over_http_and_nothing_is_logged(hostile_app, path):
    """Through the ingress to the replicas: every body naming a key twice is a 400 duplicate_key
    that names the key, and no event of such a feedback body was written (the same ids are new
    afterwards). From an address of its own: the feedback rate budget of 127.0.0.1 may be spent."""
    client = "127.0.0.12"
    for body, key in DUPLICATES:
        status, _, answer = request_from(client, hostile_app + path, "POST", body, AUTH)
        assert (status, error_code(answer)) == (400, "duplicate_key"), (body, status, answer[:300])
        assert repr(key) in json.loads(answer)["error"]["message"], answer
    if path == "/v1/predict":
        status, _, answer = request_from(client, hostile_app + path, "POST", b'{"text": "turn on the light: now"}')
        assert status == 200 and json.loads(answer)["label"] == "HassTurnOn", answer
    else:
        events = [{"event_id": "dup-1", "text": "turn on the light", "label": "HassTurnOn"},
                  {"event_id": "dup-2", "text": "hi there", "label": "HassTurnOn"}]
        status, _, answer = request_from(client, hostile_app + path, "POST", json.dumps(events).encode(), AUTH)
        assert status == 202 and json.loads(answer)["accepted"] == 2, answer  # neither id was taken before


def test_content_length_with_transfer_encoding_is_read_as_chunked_and_closed(hostile_app):
    """docs/SECURITY.md: a request with both headers is forwarded with the body read as chunked
    (Content-Length dropped), and the connection is closed after the answer, so bytes after the
    chunked body (a smuggled second request) are never read as a request."""
    import socket

    parts = urlsplit(hostile_app)
    body = json.dumps({"text": GOOD}).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    for content_length, tail in [(len(body), b""), (5, b"GET /hostile/v1/model HTTP/1.1\r\nHost: a\r\n\r\n")]:
        request = (f"POST {parts.path}/v1/predict HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {content_length}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunked + tail
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
            conn.sendall(request)
            answer, deadline = b"", time.monotonic() + 10
            while time.monotonic() < deadline:
                data = conn.recv(65_536)
                if not data:  # closed by the ingress
                    break
                answer += data
            else:
                pytest.fail(f"the connection stayed open: {answer[:300]!r}")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower(), answer[:300]
        assert json.loads(rest)["label"] == "HassTurnOn" and answer.count(b"HTTP/1.1 ") == 1, answer[:500]
