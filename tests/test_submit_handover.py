"""How a replica's feedback submit rides through a learner handover, without Ray: the real
retry loop the Classifier calls (`submit_through_handover`) against a learner handle that answers a scripted sequence (a
standby's not_owner, the old owner's actor errors, a hang, a bug), on the real clock with short
windows. The real handover under Serve is tests/test_rolling_upgrade.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorUnavailableError, RayActorError

import serve.feedback as feedback
from online_learning.protocol import Accepted, FeedbackEvent, NotOwnerAnswer
from serve.requests import RequestError

EVENTS = [FeedbackEvent("e1", "turn on the lamp", "HassTurnOn")]
ACCEPTED = Accepted(results=((0, False),))
STANDBY = NotOwnerAnswer(epoch=1, message="standing by")


class ScriptedLearner:
    """A learner handle whose `submit.remote` answers the next item of `script` (an answer, an
    exception to raise, or "hang"), then keeps answering the last one; it records call times."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls: list[float] = []
        self.submit = SimpleNamespace(remote=self._remote)

    def _remote(self, events):
        assert events is EVENTS
        self.calls.append(time.monotonic())
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]

        async def answer():
            if step == "hang":
                await asyncio.sleep(3600)
            if isinstance(step, BaseException):
                raise step
            return step
        return answer()


def submit(learner: ScriptedLearner, sync_error: str | None = None):
    return asyncio.run(feedback.submit_through_handover(learner, EVENTS, sync_error))


@pytest.fixture(autouse=True)
def short_windows(monkeypatch):
    monkeypatch.setattr(feedback, "HANDOVER_WAIT_S", 0.6)
    monkeypatch.setattr(feedback, "HANDOVER_RETRY_S", 0.05)
    monkeypatch.setattr(feedback, "SUBMIT_TIMEOUT_S", 0.3)


def test_a_standby_answer_is_retried_until_the_new_owner_accepts():
    learner = ScriptedLearner(STANDBY, STANDBY, STANDBY, ACCEPTED)
    assert submit(learner) == ACCEPTED
    assert len(learner.calls) == 4


@pytest.mark.parametrize("error", [RayActorError(), ActorUnavailableError("stopping", None)])
def test_the_old_owner_stopping_is_retried_until_an_owner_answers(error):
    learner = ScriptedLearner(error, error, STANDBY, ACCEPTED)
    assert submit(learner) == ACCEPTED
    assert len(learner.calls) == 4


def test_a_handover_longer_than_the_window_answers_not_owner_after_the_window():
    learner = ScriptedLearner(STANDBY)
    started = time.monotonic()
    assert submit(learner) == STANDBY
    took = time.monotonic() - started
    assert 0.6 <= took < 0.6 + 1.5, took  # slack for a busy machine (it runs beside the Ray tests)
    assert len(learner.calls) >= 5  # retried every HANDOVER_RETRY_S, not once


def test_a_learner_gone_longer_than_the_window_is_a_503_with_retry_after():
    learner = ScriptedLearner(RayActorError())
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        submit(learner)
    assert caught.value.status == 503 and caught.value.code == "learner_unavailable"
    assert caught.value.headers == feedback.LEARNER_RETRY_AFTER
    assert 0.6 <= time.monotonic() - started < 0.6 + 1.5
    assert len(learner.calls) >= 5


@pytest.mark.parametrize("script, calls", [
    (["hang"], 1),  # silent past SUBMIT_TIMEOUT_S: not waited for again
    ([ValueError("a bug on either side")], 1),  # not a handover: not retried
])
def test_a_silent_or_broken_learner_is_a_503_at_once(script, calls):
    learner = ScriptedLearner(*script)
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        submit(learner)
    assert caught.value.status == 503
    assert len(learner.calls) == calls  # not retried, so well inside the handover window


def test_a_learner_known_down_is_not_called():
    learner = ScriptedLearner(ACCEPTED)
    with pytest.raises(RequestError) as caught:
        submit(learner, sync_error="ConnectionError()")
    assert caught.value.status == 503 and learner.calls == []
