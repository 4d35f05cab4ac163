"""Parsing and checking /v1/predict bodies, and the one JSON error shape every 4xx/5xx uses.

Bodies are checked by hand rather than by FastAPI's model binding: every bad input must get
`{"error": {"code", "message"}}` with a status that says what was wrong, and the per-request
Python cost is what bounds a replica's throughput.
"""

from __future__ import annotations

import json
import math
import re

import orjson
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.responses import Response


def few_names(names, limit: int = 10) -> str:
    """Names for an error message, at most `limit` (a client may send thousands), each cut short."""
    shown = [repr(str(n)[:40]) for n in sorted(names)[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "[" + ", ".join(shown) + "]" + more


class RequestError(Exception):
    """A bad request: HTTP status, a stable machine code, and a message that says how to fix it."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, detail: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.detail = detail or {}  # machine-readable extras next to code and message


class ModelError(Exception):
    """The model call failed for this one text; the other texts of its batch were answered."""


def dumps(payload) -> bytes:
    """Compact UTF-8 JSON (orjson: non-ASCII as is, as json.dumps(ensure_ascii=False) wrote it)."""
    return orjson.dumps(payload)


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)


def error_body(err: RequestError) -> bytes:
    return dumps({"error": {"code": err.code, "message": err.message, **err.detail}})


def error_response(err: RequestError) -> Response:
    return Response(error_body(err), status_code=err.status, media_type="application/json", headers=err.headers)


_JSON = [(b"content-type", b"application/json")]


async def send_json(send, status: int, body: bytes, headers: dict | None = None) -> None:
    """An answer straight onto the ASGI connection: the headers a Starlette Response would send."""
    raw = [*_JSON, (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


MAX_TOP_K = 1000  # more ranked labels than any model here has; bounds the answer's size


class PredictBody(BaseModel):
    """The documented request schema (OpenAPI). Give exactly one of `text` or `texts`."""

    text: str | None = Field(None, description="one text to classify", examples=["turn on the kitchen light"])
    texts: list[str] | None = Field(None, description="several texts, answered in order")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="how many ranked labels to return (default from config)")


PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictBody.model_json_schema()}},
    }
}


# The model keeps letters and digits (regex [\p{L}\p{N}]) and drops everything else, so a text
# with neither has no tokens at all; Python's \w without "_" is the same set of characters.
_TOKEN_CHAR = re.compile(r"[^\W_]")


async def read_body(request, limit: int) -> bytes:
    """The request body, read as a stream and cut at `limit` bytes (chunked bodies included).

    The declared Content-Length is checked first; the stream is counted as it arrives, so a body
    that lies about its size or has none is never held in memory beyond the limit.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as err:  # the client left mid-body: nobody to answer, nothing to log
        raise RequestError(400, "client_disconnected", "the client closed the connection mid-body") from err
    return b"".join(chunks)


async def read_asgi_body(scope, receive, limit: int) -> bytes:
    """`read_body` for a raw ASGI request: Content-Length checked first, the stream cut at `limit`."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise RequestError(413, "body_too_large", f"request body is {value.decode()} bytes; the limit is {limit}")
            break
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):  # the usual case: one message
        body = message.get("body", b"")
        if len(body) > limit:
            raise RequestError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        return body
    chunks, size = [], 0
    while True:
        if message["type"] == "http.disconnect":  # the client left mid-body: nobody to answer
            raise RequestError(400, "client_disconnected", "the client closed the connection mid-body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: an object naming a key twice is refused (a proxy in front may read
    the other value than we would: last-wins here, first-wins elsewhere)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:  # the key as UTF-8 can write it (a lone surrogate as its escape)
                shown = key[:200].encode("utf-8", "backslashreplace").decode("utf-8")
                raise RequestError(400, "duplicate_key", f"request body has the key {shown[:100]!r} twice in one "
                                   "JSON object; send each key once", detail={"key": shown})
            seen.add(key)
    return obj


def _no_constants(name: str):
    """json's parse_constant: NaN and Infinity are not JSON (RFC 8259), though Python reads them."""
    raise RequestError(400, "malformed_json", f"request body is not JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    """json's parse_float: a number too large for a double (1e999) would read as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(400, "malformed_json", f"request body has a number out of range: {text[:40]}")
    return value


def decode_json(body: bytes, limits):
    """Size, UTF-8 and JSON checks shared by every route that takes a body; an object with a key
    twice, at any depth, is a 400 `duplicate_key`."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, "body_too_large",
                           f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, "invalid_encoding", f"request body is not valid UTF-8 (byte {err.start})") from err
    try:
        payload = json.loads(decoded, object_pairs_hook=_unique_keys, parse_constant=_no_constants,
                             parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise RequestError(400, "malformed_json", f"request body is not JSON: {err.msg} at char {err.pos}") from err
    except RecursionError as err:
        raise RequestError(400, "json_too_deep", "request body nests arrays or objects too deeply") from err
    except ValueError as err:  # an integer literal of thousands of digits
        raise RequestError(400, "number_too_large", f"request body has a number too large to read: {err}") from err
    return payload


def check_text(text: str, where: str, max_chars: int) -> None:
    """A text the model can read: encodable, within the length limit, with at least one token."""
    if len(text) > max_chars:
        raise RequestError(413, "text_too_long", f"{where} has {len(text)} characters; the limit is {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(422, "invalid_text",
                           f"{where} has a character that is not valid Unicode text (a lone surrogate at "
                           f"position {err.start}); send UTF-8 text") from err
    if _TOKEN_CHAR.search(text) is None:
        raise RequestError(422, "empty_text", f"{where} has no letters or digits, so nothing to classify")


def _shallow(value) -> bool:
    """A predict field value that cannot hide deep nesting: a scalar or a flat list of scalars."""
    if isinstance(value, list):
        return all(not isinstance(v, (list, dict)) for v in value)
    return not isinstance(value, dict)


def decode_predict(body: bytes, limits):
    """decode_json's answer, faster: orjson for the usual body. Whatever orjson refuses (bad UTF-8,
    lone surrogate escapes, NaN, integers over 64 bits, ...) or whatever could nest deeply goes
    through decode_json, so every bad body gets the same code and message as before.

    orjson keeps the last of two equal keys and has no hook to say so. Every key in the body is
    followed by a ':' outside strings, so a body with no more ':' bytes than the object has keys
    cannot name a key twice (nested objects never take this path); any other body (a duplicate,
    or a text with a ':' in it) is parsed again by decode_json, which refuses duplicates."""
    if len(body) <= limits.max_body_bytes:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(payload, dict) and body.count(b":") <= len(payload) \
                    and all(_shallow(v) for v in payload.values()):
                return payload
    return decode_json(body, limits)


def parse_predict(body: bytes, limits) -> tuple[list[str], bool, int]:
    """Return (texts, was_a_list, top_k) or raise RequestError. `limits` is the app's settings."""
    payload = decode_predict(body, limits)
    if not isinstance(payload, dict):
        raise RequestError(422, "invalid_request", 'send a JSON object: {"text": "..."} or {"texts": ["...", ...]}')
    unknown = set(payload) - {"text", "texts", "top_k"}
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown field(s) {few_names(unknown)}; allowed: text, texts, top_k")
    has_text, has_texts = "text" in payload, "texts" in payload
    if has_text == has_texts:
        raise RequestError(422, "invalid_request", 'give exactly one of "text" (a string) or "texts" (a list of strings)')
    if has_text:
        texts, is_list = [payload["text"]], False
        if not isinstance(texts[0], str):
            raise RequestError(422, "invalid_type", f'"text" must be a string, got {type(texts[0]).__name__}')
    else:
        texts, is_list = payload["texts"], True
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(422, "invalid_type", '"texts" must be a list of strings')
        if not texts:
            raise RequestError(422, "empty_text", '"texts" is empty; send at least one text')
        if len(texts) > limits.max_texts:
            raise RequestError(413, "too_many_texts", f"{len(texts)} texts; the limit is {limits.max_texts} per request")
    for i, text in enumerate(texts):
        check_text(text, f"texts[{i}]" if is_list else "text", limits.max_text_chars)
    top_k = payload.get("top_k", limits.top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(422, "invalid_type", f'"top_k" must be an integer from 1 to {MAX_TOP_K}')
    return texts, is_list, top_k
