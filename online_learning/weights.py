"""What a publish carries, and how a model copy applies it.

An update is either a delta (the embedding rows touched since the previous version, plus every
other weight: LSTM or Conv1D kernels and the output layer) or a full set of weights, for a replica
that missed versions or has just started. Every variable but the embedding counts as dense,
whatever the model family. Both are plain numpy in the protocol's update classes
(online_learning/protocol.py), put once into Ray's object store and fetched by each node's
replicas. Sizes per model: docs/ONLINE_LEARNING.md.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from online_learning.protocol import DeltaUpdate, FullUpdate, Update


def embedding_variable(model):
    return model.get_layer("embedding").embeddings


def dense_variables(model) -> list:
    emb = embedding_variable(model)
    return [v for v in model.weights if v is not emb]


def make_delta(model, rows, version: int, log_offset: int) -> DeltaUpdate:
    """The rows `rows` of the embedding and every dense weight, not yet named (`DeltaUpdate.named`)."""
    rows = np.asarray(sorted(rows), dtype=np.int64)
    emb = embedding_variable(model)
    values = tf.gather(emb.value, rows).numpy() if rows.size else np.zeros((0, emb.shape[1]), np.float32)
    return DeltaUpdate(version=version, log_offset=log_offset, rows=rows, row_values=values,
                       dense=[v.numpy() for v in dense_variables(model)])


def make_full(model, version: int, log_offset: int, signature: str = "") -> FullUpdate:
    """Every weight, not yet named (`FullUpdate.named`); `signature`: the model's (model_signature)."""
    return FullUpdate(version=version, log_offset=log_offset, embedding=embedding_variable(model).numpy(),
                      dense=[v.numpy() for v in dense_variables(model)], signature=signature)


def apply_update(model, update: Update, digest=None) -> None:
    """Write an update into a model's variables (caller makes sure no batch runs meanwhile).

    `digest` (a WeightsDigest of the model) follows the change: rows incrementally, dense weights
    rehashed; after a full update the caller computes it afresh."""
    emb = embedding_variable(model)
    if isinstance(update, FullUpdate):
        emb.assign(update.embedding)
    elif update.rows.size:
        if digest is not None:
            old = tf.gather(emb.value, update.rows).numpy()
        emb.value.scatter_update(tf.IndexedSlices(update.row_values, update.rows))
        if digest is not None:
            digest.update_rows(update.rows, old, update.row_values)
    for var, value in zip(dense_variables(model), update.dense):
        var.assign(value)
    if digest is not None and isinstance(update, DeltaUpdate):
        digest.set_dense(update.dense)
