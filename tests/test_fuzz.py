"""Property-based fuzzing of every route with Hypothesis: no answer >= 500, the JSON error shape on
every 4xx, and the app still answering right afterwards.

Bodies are drawn from three families: arbitrary bytes, arbitrary JSON (any nesting, any Unicode
including lone surrogates), and JSON shaped like the OpenAPI schema with hostile field values.
Requests rotate over 100 loopback source addresses so the feedback rate limit (per client)
leaves room for the parser to be reached; 429 is a valid answer all the same.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests._clients import AUTH, error_code, request_from

EXAMPLES = 1000
SOURCES = [f"127.0.1.{i}" for i in range(1, 101)]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck))

any_char = st.characters(codec=None, categories=None)  # every code point, lone surrogates included
texts = st.one_of(st.text(any_char, max_size=40), st.text(max_size=40),
                  st.sampled_from(["", " ", "\u0000", "!!!", "turn on the light", "x" * 2500, "\ud800", "조명 켜줘"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                        max_leaves=12)
predict_shaped = st.fixed_dictionaries({}, optional={
    "text": st.one_of(texts, scalars), "texts": st.one_of(st.lists(texts, max_size=70), scalars),
    "top_k": st.one_of(st.integers(-5, 2000), st.integers(), scalars), "extra": scalars})
event = st.fixed_dictionaries({}, optional={
    "event_id": texts, "text": texts, "label": st.one_of(st.sampled_from(["HassTurnOn", "HassTurnOff"]), texts),
    "extra": scalars})
feedback_shaped = st.one_of(event, st.lists(event, max_size=5))
header_chars = st.characters(min_codepoint=1, max_codepoint=255, exclude_characters="\r\n")  # CTLs, obs-text
auth_headers = st.one_of(st.just({}), st.just(AUTH),
                         st.builds(lambda t: {"Authorization": f"Bearer {t}"}, st.text(header_chars, max_size=20)),
                         st.builds(lambda t: {"X-Anything": t}, st.text(header_chars, max_size=20)))


def _encode(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # lone surrogates travel as \\ud800 escapes


def bodies(shaped):
    return st.one_of(st.binary(max_size=300), any_json.map(_encode), shaped.map(_encode))


class _Sent:
    def __init__(self):
        self.count = 0
        self.statuses: dict[int, int] = {}

    def check(self, status: int, body: bytes, what) -> None:
        self.count += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, (status, body[:300], what)
        if status >= 400:
            assert error_code(body), (status, body[:300], what)


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/feedback"])
def test_fuzz_post_routes_never_answer_5xx(hostile_app, route):
    sent = _Sent()
    shaped = predict_shaped if route == "/v1/predict" else feedback_shaped

    @FUZZ
    @given(body=bodies(shaped), headers=auth_headers)
    def one(body, headers):
        status, _, answer = request_from(SOURCES[sent.count % len(SOURCES)], hostile_app + route, "POST", body, headers)
        sent.check(status, answer, body[:200])

    one()
    print(f"\n{route}: {sent.count} requests, statuses {dict(sorted(sent.statuses.items()))}")
    assert sent.count >= EXAMPLES
    status, _, answer = request_from("127.0.0.1", f"{hostile_app}/v1/predict", "POST", _encode({"text": "turn on the light"}))
    assert status == 200 and json.loads(answer)["label"] == "HassTurnOn"


@pytest.mark.parametrize("route", ["/v1/model", "/healthz"])
def test_fuzz_get_routes_never_answer_5xx(hostile_app, route):
    sent = _Sent()
    queries = st.text(st.characters(codec="ascii", min_codepoint=33, exclude_characters="#"), max_size=30)

    @FUZZ
    @given(query=queries, headers=auth_headers, method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE"]))
    def one(query, headers, method):
        from urllib.parse import quote

        url = f"{hostile_app}{route}?{quote(query, safe='=&')}"
        status, _, answer = request_from(SOURCES[sent.count % len(SOURCES)], url, method, None, headers)
        sent.check(status, answer, (method, query))

    one()
    print(f"\n{route}: {sent.count} requests, statuses {dict(sorted(sent.statuses.items()))}")
    assert sent.count >= EXAMPLES
