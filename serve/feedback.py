"""Checks for POST /v1/feedback: bearer token, per-client rate limit, and the events themselves."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

from ray.exceptions import ActorUnavailableError, RayActorError

from online_learning.protocol import Accepted, Conflict, FeedbackEvent, NotOwnerAnswer, SubmitAnswer, WriteFailed
from serve.ingress import from_our_ingress
from serve.requests import RequestError, check_text, decode_json, few_names as _few

logger = logging.getLogger("ray.serve")

# A submit fsyncs the log before it answers, so it may take longer than the learner's in-memory
# calls; past this the learner counts as unavailable (503) rather than holding the client.
SUBMIT_TIMEOUT_S = 10.0
# A feedback request waits this long for a learner handover (the old owner stopping, a standby
# taking the log) before it answers 503, retrying every HANDOVER_RETRY_S.
HANDOVER_WAIT_S = 5.0
HANDOVER_RETRY_S = 0.1
# Retry-After of a 503 while the learner is unreachable: a learner restart takes seconds.
LEARNER_RETRY_AFTER = {"Retry-After": "2"}


def authorization_of(request) -> str | None:
    """The request's one Authorization header. Two are a 400, on every route, before any token is
    compared or any rate budget spent: a proxy in front may check the other one than we would
    (first-wins here, last-wins elsewhere), as with a key twice in a body."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise RequestError(400, "duplicate_header", f"the request has {len(values)} Authorization headers; send one")
    return values[0] if values else None


def check_token(authorization: str | None, token_env: str) -> None:
    """401 without a bearer token, 403 with a wrong one (or when none is configured)."""
    expected = os.environ.get(token_env, "")
    if not expected:
        raise RequestError(403, "feedback_disabled",
                           f"feedback is disabled: no token configured (set {token_env} where Serve runs)")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "unauthorized", "send the feedback token as 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise RequestError(403, "forbidden", "the bearer token is not valid")


def token_ok(authorization: str | None, token_env: str) -> bool:
    """Whether the request carries the configured bearer token (False when none is configured)."""
    try:
        check_token(authorization, token_env)
    except RequestError:
        return False
    return True


def client_key(request, trusted_header: str | None) -> str:
    """Who is asking, from what our own ingress says, never from what the client says.

    Behind the hardened HAProxy ingress, `trusted_header` is set by HAProxy to the peer address
    (overwriting any value the client sent) next to this run's ingress secret; a request that
    reached the replica some other way has no secret, and its peer address is the key.
    X-Forwarded-For is client-controlled and never read.
    """
    if trusted_header and from_our_ingress(request.headers):
        value = request.headers.get(trusted_header)
        if value:
            return value[:64]
    return request.client.host if request.client else "unknown"


def parse_feedback(body: bytes, limits, learner, labels: set[str]) -> list[FeedbackEvent]:
    """Validate a feedback body: one event object or a list; every event checked before any is kept."""
    payload = decode_json(body, limits)
    events = payload if isinstance(payload, list) else [payload]
    if not events:
        raise RequestError(422, "empty_events", "the list of events is empty")
    if len(events) > learner.max_events:
        raise RequestError(413, "too_many_events", f"{len(events)} events; the limit is {learner.max_events} per request")
    out = []
    for i, ev in enumerate(events):
        where = f"event[{i}]" if isinstance(payload, list) else "event"
        if not isinstance(ev, dict):
            raise RequestError(422, "invalid_request", f'{where}: expected an object {{"event_id", "text", "label"}}')
        unknown = set(ev) - {"event_id", "text", "label"}
        if unknown:
            raise RequestError(422, "invalid_request", f"{where}: unknown field(s) {_few(unknown)}")
        for key in ("event_id", "text", "label"):
            if not isinstance(ev.get(key), str):
                raise RequestError(422, "invalid_type", f'{where}: "{key}" must be a string')
        if not ev["event_id"].strip() or len(ev["event_id"]) > 200 or not ev["event_id"].isprintable():
            raise RequestError(422, "invalid_event_id", f"{where}: event_id must be 1-200 printable characters")
        check_text(ev["text"], f"{where}: text", limits.max_text_chars)
        if ev["label"] not in labels:
            raise RequestError(422, "unknown_label",
                               f"{where}: unknown label {ev['label'][:100]!r}; GET /v1/model lists the labels")
        out.append(FeedbackEvent(ev["event_id"], ev["text"].strip(), ev["label"]))
    return out


def feedback_json_schema() -> dict:
    event = {"type": "object", "required": ["event_id", "text", "label"],
             "properties": {k: {"type": "string"} for k in ("event_id", "text", "label")}}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"oneOf": [event, {"type": "array", "items": event}]}}}}}


def submit_answer(reply: SubmitAnswer) -> dict:
    """The 202 body for the learner's answer to `submit`, or the RequestError it stands for:
    nothing of the request was acknowledged unless the answer is `Accepted`."""
    if isinstance(reply, NotOwnerAnswer):  # a standby during a handover; the owner answers within a second or two
        raise RequestError(503, "not_owner", f"the learner that answered does not own the feedback log "
                           f"({reply.message}); nothing in this request was acknowledged; retry",
                           {"Retry-After": "1"}, detail={"epoch": reply.epoch})
    if isinstance(reply, WriteFailed):
        raise RequestError(
            507, "log_write_failed", f"the feedback log could not be written ({reply.errno}); nothing in this "
            "request was acknowledged; retry later", {"Retry-After": "30"}, detail={"errno": reply.errno})
    if isinstance(reply, Conflict):
        raise RequestError(
            409, "event_id_conflict", f"event_id {reply.event_id[:200]!r} " + (
                f"already names another event (offset {reply.offset})" if reply.offset is not None
                else "appears twice in this request") + " with a different text or label; nothing in this "
            "request was written. Use a new event_id for a new event", detail={"event_id": reply.event_id})
    if not isinstance(reply, Accepted):
        raise TypeError(f"not an answer to submit: {reply!r}")
    dups = sum(1 for _, dup in reply.results if dup)
    return {"accepted": len(reply.results) - dups, "duplicates": dups, "offsets": [off for off, _ in reply.results]}


async def submit_through_handover(learner, events: list[FeedbackEvent], known_down: str | None) -> SubmitAnswer:
    """The answer of `learner` (a handle to the OnlineLearner deployment) to `events`, riding
    through a learner handover: answers from a standby (`not_owner`) and calls that failed (the
    old owner stopping) are retried for up to HANDOVER_WAIT_S (safe: an event already written is
    answered as a duplicate of itself). A learner known down (`known_down`: why the replica's
    polls fail) or silent for SUBMIT_TIMEOUT_S is not waited for: 503 learner_unavailable."""
    deadline = time.monotonic() + HANDOVER_WAIT_S
    unavailable = RequestError(503, "learner_unavailable", "the learner is restarting; retry", LEARNER_RETRY_AFTER)
    if known_down is not None:
        raise unavailable
    while True:
        try:
            reply = await asyncio.wait_for(learner.submit.remote(events), timeout=SUBMIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("feedback not accepted: the learner did not answer in %s s", SUBMIT_TIMEOUT_S)
            raise unavailable from None
        except (RayActorError, ActorUnavailableError) as err:
            # The learner stopping or restarting. It may have written the events before it
            # died: the retry then answers them as duplicates, acknowledged once in the log.
            if time.monotonic() >= deadline:
                logger.warning("feedback not accepted, learner unavailable: %r", err)
                raise unavailable from None
            await asyncio.sleep(HANDOVER_RETRY_S)
            continue
        except Exception as err:  # anything else (a bug on either side): not retried
            logger.warning("feedback not accepted, learner call failed: %r", err)
            raise unavailable from None
        if not isinstance(reply, NotOwnerAnswer) or time.monotonic() >= deadline:
            return reply
        await asyncio.sleep(HANDOVER_RETRY_S)  # a standby answered: the owner may be handing over
