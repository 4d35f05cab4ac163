"""The replica's model follower fences superseded learners: once it has seen an ownership epoch,
answers and updates of a lower epoch (or of a learner that owns no log) change nothing it serves.
Checked on the weights the replica serves (their digest, recomputed from the model, and the
model's answers), on a real model from a real store; no Ray needed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from online_learning.digest import model_digest
from online_learning.protocol import LearnerInfo, ReplicaIdentity, Update, UpdatesAnswer
from online_learning.weights import embedding_variable, make_delta, make_full

TEXTS = ["turn on the lights in the kitchen", "turn off the fan", "what time is it"]


@pytest.fixture()
def follower(trained_store):
    from serve.model_follower import ModelFollower
    from serve.settings import AppSettings

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    follower = ModelFollower(AppSettings(model_store=trained_store), None, "test-replica", pool)
    assert follower.load_latest()
    yield follower
    pool.shutdown()


def _learner_copy(store: str):
    from train.store import ModelStore

    return ModelStore(store).load()


def _moved(loaded, rows, scale: float):
    """The learner's copy after training touched `rows` (and, so the answers move, the dense weights)."""
    emb = embedding_variable(loaded.model)
    values = emb.numpy()
    values[rows] += scale
    emb.assign(values)
    loaded.model.layers[-1].kernel.assign(loaded.model.layers[-1].kernel.numpy() * (1 + scale))
    return loaded


def _info(loaded_model, update: Update, lineage: str, epoch: int | None, **extra) -> LearnerInfo:
    identity = ReplicaIdentity(lineage, update.version, model_digest(loaded_model).hexdigest(), update.log_offset)
    return LearnerInfo(epoch=epoch or 0, identity=identity, ready_offset=update.log_offset, base_version=1,
                       published_at=0.0, **extra)


def _reply(kind: str, loaded_model, update: Update, lineage: str, epoch: int | None, update_epoch: int | None = None,
           **extra) -> tuple[UpdatesAnswer, list[Update]]:
    """An answer of `updates_since` as the learner of `epoch` sends it, its refs already fetched."""
    published = update.named(lineage, model_digest(loaded_model).hexdigest(),
                             update_epoch if update_epoch is not None else epoch or 0)
    return UpdatesAnswer(kind, _info(loaded_model, update, lineage, epoch, **extra)), [published]


def _served(follower) -> tuple[str, list]:
    """What the replica serves: the digest of the weights in its model, and its answers."""
    served = follower.model
    answers = served.classify(TEXTS, [3] * len(TEXTS))
    return model_digest(served.loaded.model).hexdigest(), [[(a["label"], round(a["score"], 6)) for a in ans["top_k"]]
                                                            for ans in answers]


def _expected(loaded) -> tuple[str, list]:
    """The same, computed on the publishing learner's own copy."""
    from serve.runner import ServedModel

    own = ServedModel(loaded)
    answers = own.classify(TEXTS, [3] * len(TEXTS))
    return own.digest, [[(a["label"], round(a["score"], 6)) for a in ans["top_k"]] for ans in answers]


def test_updates_from_a_lower_epoch_are_ignored(follower, trained_store):
    apply = lambda reply_updates: asyncio.run(follower.apply(*reply_updates))  # noqa: E731
    start = _served(follower)
    base_version = follower.model.version

    # The owner of epoch 2 publishes full weights under its lineage: the replica takes them.
    new_owner = _moved(_learner_copy(trained_store), np.array([3, 17, 4000]), 0.25)
    full = make_full(new_owner.model, base_version + 1, 10)
    assert apply(_reply("full", new_owner.model, full, "owner-2", epoch=2))
    assert follower.epoch == 2
    after_owner = _served(follower)
    assert after_owner == _expected(new_owner) and after_owner != start

    # The superseded owner (epoch 1) publishes a delta that follows what the replica holds, with a
    # true digest: without the fence it would be applied (checked at the end). It is ignored.
    old_owner = _moved(_learner_copy(trained_store), np.array([3, 17, 4000]), 0.25)
    rows = np.array([5, 9, 2048])
    _moved(old_owner, rows, -0.5)
    delta = make_delta(old_owner.model, rows, base_version + 2, 11)
    stale = _reply("deltas", old_owner.model, delta, "owner-2", epoch=1)
    identity = follower.model.identity
    assert not apply(stale)
    assert _served(follower) == after_owner and follower.model.identity == identity
    assert follower.learner_info.epoch == 2  # the fenced answer did not replace what the replica knows

    # The same update inside an answer of epoch 2, or with no epoch at all (read as 0): still fenced.
    assert not apply(_reply("deltas", old_owner.model, delta, "owner-2", epoch=2, update_epoch=1))
    assert not apply(_reply("deltas", old_owner.model, delta, "owner-2", epoch=None))
    # A learner that says it owns no log (a standby) changes nothing either, whatever its epoch.
    assert not apply(_reply("deltas", old_owner.model, delta, "owner-2", epoch=3, owner=False))
    assert _served(follower) == after_owner and follower.epoch == 2

    # The control: the very same delta, published by the current owner, is applied.
    assert apply(_reply("deltas", old_owner.model, delta, "owner-2", epoch=2))
    assert _served(follower) == _expected(old_owner) != after_owner
    assert follower.model.identity.version == base_version + 2


def test_a_learner_that_names_no_epoch_is_followed(follower, trained_store):
    """Before the learner carries epochs (none anywhere), updates apply as they always did."""
    trained = _moved(_learner_copy(trained_store), np.array([7, 70]), 0.3)
    full = make_full(trained.model, follower.model.version + 1, 4)
    assert asyncio.run(follower.apply(*_reply("full", trained.model, full, "no-epochs", epoch=None)))
    assert follower.epoch == 0 and _served(follower) == _expected(trained)


def test_readiness_follows_the_owner_and_survives_a_handover(trained_store):
    """Readiness from the learner's answers: an owner still adopting (no target yet) leaves a
    serving replica ready; an owner whose target a starting replica lacks makes it catch up; a
    standby's answer changes nothing; a replica that met a target once stays ready while it syncs."""
    from serve.model_follower import ModelFollower
    from serve.settings import AppSettings

    with ThreadPoolExecutor(max_workers=1) as pool:
        # The learner handle is never called by apply/readiness; any object stands for "there is one".
        follower = ModelFollower(AppSettings(model_store=trained_store), object(), "test-replica", pool)
        assert follower.load_latest()
        served = follower.model

        def answer(**info):
            return asyncio.run(follower.apply(UpdatesAnswer("wait", LearnerInfo(**info)), []))

        assert answer(epoch=4, owner=True)  # an owner adopting its base after a takeover
        assert follower.readiness() == (True, "learner_unreachable") and follower.epoch == 4
        assert answer(epoch=4, owner=True, ready_offset=served.log_offset + 5)  # replaying
        assert follower.readiness() == (False, "catching_up")
        assert not answer(epoch=0, owner=False)  # a standby: ignored
        assert not answer(epoch=3, ready_offset=-1)  # the superseded owner: ignored
        assert follower.readiness() == (False, "catching_up")
        assert answer(epoch=4, owner=True, ready_offset=served.log_offset)
        assert follower.readiness() == (True, "ready")
        # Ready once: a newer target (the next learner's replay after a deploy) leaves it serving.
        assert answer(epoch=5, owner=True, ready_offset=served.log_offset + 9)
        assert follower.readiness() == (True, "syncing")
