"""One replica's model: the compiled call, answers from probabilities, and applying updates.

Model calls and updates both run on the replica's single model thread, so an update always
lands between two batches, never inside one, and each answer names the version that made it.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import tensorflow as tf

from online_learning.protocol import FullUpdate, ReplicaIdentity, Update
from serve.requests import ModelError
from train.model import LoadedModel, model_signature


class DigestMismatch(RuntimeError):
    """The weights after an update are not the ones the learner published under that version."""


class ModelMismatch(DigestMismatch):
    """Full weights of another model (family, size, features or label set): the replica must load the
    lineage's base version from the store (config + weights) before it can take them."""


class ServedModel:
    def __init__(self, loaded: LoadedModel):
        from online_learning.digest import model_digest

        self.loaded = loaded
        self.signature = model_signature(loaded)
        self.version = loaded.version
        # A store version is named by the lineage that wrote it (a learner snapshot), else by itself.
        self.lineage = loaded.metrics.get("lineage") or f"store-v{loaded.version}"
        self.log_offset = loaded.metrics.get("log_offset", -1)  # newest feedback event included
        self._digest = model_digest(loaded.model)  # of the weights this replica holds, computed here
        self.digest = self._digest.hexdigest()
        self.labels = np.array(loaded.labels, dtype=object)
        self.label_set = frozenset(loaded.labels)  # feedback labels are checked against it
        self._fn = loaded.predict_fn()
        self._fn(tf.constant(["warm up"]))  # trace now, not on the first request

    def classify(self, texts: list[str], top_ks: list[int]) -> list[dict]:
        """Runs on the model thread (off the replica's event loop); one model call per batch."""
        version = self.version
        probs = self._fn(tf.constant(texts, dtype=tf.string)).numpy()
        k = min(max(top_ks), probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        answers = []
        for row, idx, want in zip(probs, top, top_ks):
            ranked = [{"label": self.labels[i], "score": float(row[i])} for i in idx[:want]]
            answers.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked,
                            "model_version": version, "batch_size": len(texts)})
        return answers

    def classify_isolated(self, texts: list[str], top_ks: list[int]) -> list:
        """`classify`, but a text the model fails on gets a ModelError and its neighbours their
        answers: the batch is retried one text at a time (texts are validated before they join a
        batch, so this is the last line of defence, not a path taken in normal operation)."""
        try:
            return self.classify(texts, top_ks)
        except Exception as err:  # noqa: BLE001 - any model failure must stay with its own text
            if len(texts) == 1:
                return [ModelError(repr(err))]
        answers = []
        for text, top_k in zip(texts, top_ks):
            try:
                answers.extend(self.classify([text], [top_k]))
            except Exception as err:  # noqa: BLE001
                answers.append(ModelError(repr(err)))
        return answers

    @property
    def identity(self) -> ReplicaIdentity:
        return ReplicaIdentity(self.lineage, self.version, self.digest, self.log_offset)

    @property
    def poll_identity(self) -> ReplicaIdentity:
        """What the replica tells the learner it holds: after a refused update it names no
        lineage, so the learner's answer is full weights (answers keep the true identity)."""
        return dataclasses.replace(self.identity, lineage="resync") if self._resync else self.identity

    _resync = False

    def apply(self, updates: list[Update]) -> None:
        """Runs on the model thread. Each update is checked before anything is written: a delta
        must follow this lineage and version, and the digest the weights would have after it must
        be the one the learner published. A refused update leaves the weights, and the identity
        that names them, as they were; the next poll asks for full weights (DigestMismatch)."""
        from online_learning.digest import WeightsDigest
        from online_learning.weights import apply_update, dense_variables, embedding_variable

        for update in updates:
            full = isinstance(update, FullUpdate)
            name = f"{update.lineage}/v{update.version}"
            if not full and (update.lineage != self.lineage or update.version != self.version + 1):
                self._resync = True
                raise DigestMismatch(f"delta {name} does not follow {self.lineage}/v{self.version}")
            if full and update.signature and update.signature != self.signature:
                raise ModelMismatch(f"{name} is another model (family, size, features or labels) than this replica's")
            shapes = [tuple(v.shape) for v in dense_variables(self.loaded.model)]
            if shapes != [a.shape for a in update.dense] or (
                    full and update.embedding.shape != tuple(embedding_variable(self.loaded.model).shape)):
                if full:  # checked before hashing: nothing spent on weights that cannot fit
                    raise ModelMismatch(f"{name} is another model (family, size or labels) than this replica's")
                self._resync = True
                raise DigestMismatch(f"{name}: dense shapes do not fit this model")
            if full:
                after = WeightsDigest(update.embedding, update.dense)
            else:
                after = copy.copy(self._digest)
                if update.rows.size:
                    old = tf.gather(embedding_variable(self.loaded.model).value, update.rows).numpy()
                    after.update_rows(update.rows, old, update.row_values)
                after.set_dense(update.dense)
            if after.hexdigest() != update.digest:
                self._resync = True
                raise DigestMismatch(f"{update.kind} {name} would give digest {after.hexdigest()}, the learner "
                                     f"published {update.digest}; not applied")
            apply_update(self.loaded.model, update)
            self._digest, self._resync = after, False
            self.version, self.log_offset, self.lineage = update.version, update.log_offset, update.lineage
            self.digest = after.hexdigest()

    def relabel(self, identity: ReplicaIdentity) -> None:
        """Same weights (equal digests), the learner's name for them: no weights move."""
        if identity.digest != self.digest:
            raise DigestMismatch(f"relabel to {identity.digest} but this replica holds {self.digest}")
        self.lineage, self.version, self.log_offset = identity.lineage, identity.version, identity.log_offset
        self._resync = False
