"""A replica checks every update before it writes: an update whose result would not be the
weights the learner published is refused whole, the replica keeps answering under the version
its weights really are, and its next poll asks for full weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from online_learning.digest import model_digest
from online_learning.protocol import ReplicaIdentity, Update
from online_learning.weights import embedding_variable, make_delta, make_full

TEXTS = ["turn on the lights in the kitchen", "turn off the fan"]


def _published(model, update: Update, lineage: str) -> Update:
    """What the learner sends: the update named by its lineage, with the digest of its weights."""
    return update.named(lineage, model_digest(model).hexdigest(), epoch=0)


@pytest.fixture()
def served_and_learner(trained_store):
    from serve.runner import ServedModel
    from train.store import ModelStore

    served = ServedModel(ModelStore(trained_store).load())
    learner = ModelStore(trained_store).load().model  # the learner's own copy
    return served, learner


def _train_rows(model, rows, scale):
    emb = embedding_variable(model)
    values = emb.numpy()
    values[rows] += scale
    emb.assign(values)


def test_a_good_delta_is_applied_and_a_bad_one_changes_nothing(served_and_learner):
    served, learner = served_and_learner
    lineage = served.lineage
    rows = np.array([3, 17, 4000])
    _train_rows(learner, rows, 0.25)
    good = _published(learner, make_delta(learner, rows, served.version + 1, 10), lineage)
    served.apply([good])
    assert served.identity == ReplicaIdentity(lineage, good.version, good.digest, 10)
    np.testing.assert_array_equal(embedding_variable(served.loaded.model).numpy(), embedding_variable(learner).numpy())

    from serve.runner import DigestMismatch

    _train_rows(learner, rows, 0.5)
    bad = _published(learner, make_delta(learner, rows, served.version + 1, 11), lineage)
    bad = dataclasses.replace(bad, row_values=bad.row_values + 1.0)  # corrupted on the way: not the published weights
    before_weights = [w.copy() for w in served.loaded.model.get_weights()]
    before_identity, before_answers = served.identity, served.classify(TEXTS, [3, 3])
    with pytest.raises(DigestMismatch, match="not applied"):
        served.apply([bad])
    for was, now in zip(before_weights, served.loaded.model.get_weights()):
        np.testing.assert_array_equal(was, now)
    assert served.identity == before_identity
    assert served.classify(TEXTS, [3, 3]) == before_answers  # answers still name the true version
    assert served.poll_identity.lineage != lineage  # so the learner answers with full weights

    full = _published(learner, make_full(learner, served.version + 1, 11), lineage)
    served.apply([full])
    assert served.poll_identity == served.identity and served.digest == full.digest
    np.testing.assert_array_equal(embedding_variable(served.loaded.model).numpy(), embedding_variable(learner).numpy())


def test_a_delta_out_of_order_or_a_corrupted_full_is_refused(served_and_learner):
    from serve.runner import DigestMismatch

    served, learner = served_and_learner
    before = served.identity
    _train_rows(learner, np.array([5]), 0.3)
    skipped = _published(learner, make_delta(learner, np.array([5]), served.version + 2, 12), served.lineage)
    with pytest.raises(DigestMismatch, match="does not follow"):
        served.apply([skipped])
    assert served.poll_identity.lineage != served.lineage  # its next poll asks for full weights
    full = _published(learner, make_full(learner, served.version + 1, 12), "another-lineage")
    full = dataclasses.replace(full, embedding=full.embedding.copy())
    full.embedding[5] = 0.0
    with pytest.raises(DigestMismatch, match="not applied"):
        served.apply([full])
    assert served.identity == before and model_digest(served.loaded.model).hexdigest() == before.digest


def test_full_weights_of_another_model_are_refused_before_any_work(served_and_learner):
    """A CNN's (or another label set's) weights cannot go into this LSTM: ModelMismatch, so the
    replica loads the lineage's base version from the store instead (tests/test_cnn_family.py)."""
    from serve.runner import ModelMismatch
    from train.model import new_model

    served, _ = served_and_learner
    before = served.identity
    other = new_model("small", served.loaded.labels, "cnn").model
    full = _published(other, make_full(other, served.version + 1, 13), "cnn-lineage")
    with pytest.raises(ModelMismatch, match="another model"):
        served.apply([full])
    assert served.identity == before and model_digest(served.loaded.model).hexdigest() == before.digest


def test_full_weights_of_a_model_with_other_features_and_equal_shapes_are_refused(served_and_learner):
    """A subword LSTM has this words LSTM's weight shapes, but tokenises otherwise: its weights in
    this replica would answer through the wrong features. The learner signs its full updates with
    the model's signature, so the replica refuses them (ModelMismatch: it loads the lineage's base
    from the store instead); an unsigned full (an older learner) is still judged by shapes."""
    from serve.runner import ModelMismatch
    from train.model import model_signature, new_model

    served, _ = served_and_learner
    before = served.identity
    other = new_model("small", served.loaded.labels, "lstm", (2, 3))
    assert [w.shape for w in other.model.weights] == [w.shape for w in served.loaded.model.weights]
    full = _published(other.model, make_full(other.model, served.version + 1, 14, model_signature(other)), "sub")
    with pytest.raises(ModelMismatch, match="features"):
        served.apply([full])
    assert served.identity == before and model_digest(served.loaded.model).hexdigest() == before.digest
    same = _published(served.loaded.model, make_full(served.loaded.model, served.version + 1, 15,
                                                      model_signature(served.loaded)), "same")
    served.apply([same])  # signed by an equal model: taken
    assert served.identity.lineage == "same" and served.version == before.version + 1
