"""The learner's own training copy: mini-batch updates with a sparse (lazy) Adam on the embedding.

Plain Adam keeps moving every embedding row that still has momentum, so after a while every row
ever touched changes on every step and a "delta" would be most of the model. Lazy Adam updates
only the rows in the current mini-batch (their moments included), so the rows touched since the
last publish are exactly the rows that changed. Dense weights (LSTM or Conv1D kernels, output)
use ordinary Adam.

Each embedding row keeps its own step count for Adam's bias correction, so a row whose moments
are reset (a held-back candidate) restarts like a fresh one. With one global count, zeroed
moments under a large count make the next few hundred steps several times the learning rate
(m/sqrt(v) starts at 0.1/sqrt(0.001)), so every round after one held back would overshoot and be
held back in turn.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from online_learning.weights import dense_variables, embedding_variable
from train.model import LoadedModel

_B1, _B2, _EPS = 0.9, 0.999, 1e-7


class OnlineTrainer:
    def __init__(self, loaded: LoadedModel, learning_rate: float, dense_learning_rate: float | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.index = {label: i for i, label in enumerate(loaded.labels)}
        self._emb = embedding_variable(self.model)
        self._dense = [v for v in dense_variables(self.model) if v.trainable]
        # The shared dense weights carry what the base knows; new words and languages live in
        # embedding rows (their own word rows; n-gram rows are shared with known words). A lower rate for the dense part (learner setting
        # `dense_learning_rate`) keeps the base's answers while new rows learn fast.
        self._opt = keras.optimizers.Adam(dense_learning_rate or learning_rate)
        self._opt.build(self._dense)
        self._lr = learning_rate
        self._m = tf.Variable(tf.zeros(self._emb.shape), trainable=False)
        self._v = tf.Variable(tf.zeros(self._emb.shape), trainable=False)
        self._t = tf.Variable(tf.zeros(self._emb.shape[0]), trainable=False)  # per-row step counts
        self._loss = keras.losses.SparseCategoricalCrossentropy()
        self.touched: set[int] = set()  # embedding rows changed since the last publish
        self.steps = 0

    @tf.function(reduce_retracing=True)
    def _step(self, texts, labels):
        with tf.GradientTape() as tape:
            probs = self.model(texts, training=True)
            loss = self._loss(labels, probs)
        grads = tape.gradient(loss, [self._emb, *self._dense])
        self._opt.apply_gradients(zip(grads[1:], self._dense))
        g = grads[0]
        if not isinstance(g, tf.IndexedSlices):  # dense gradient: keep the rows it touches
            ids = tf.unique(tf.reshape(self.model.get_layer("tokens")(texts), [-1]))[0]
            g = tf.IndexedSlices(tf.gather(g, ids), ids)
        rows, segment = tf.unique(tf.cast(g.indices, tf.int64))
        g_rows = tf.math.unsorted_segment_sum(g.values, segment, tf.shape(rows)[0])
        t = tf.gather(self._t, rows) + 1.0
        self._t.scatter_update(tf.IndexedSlices(t, rows))
        lr_t = tf.expand_dims(self._lr * tf.sqrt(1.0 - _B2**t) / (1.0 - _B1**t), 1)
        m_rows = _B1 * tf.gather(self._m, rows) + (1.0 - _B1) * g_rows
        v_rows = _B2 * tf.gather(self._v, rows) + (1.0 - _B2) * tf.square(g_rows)
        self._m.scatter_update(tf.IndexedSlices(m_rows, rows))
        self._v.scatter_update(tf.IndexedSlices(v_rows, rows))
        self._emb.value.scatter_sub(tf.IndexedSlices(lr_t * m_rows / (tf.sqrt(v_rows) + _EPS), rows))
        return loss, rows

    def train(self, texts: list[str], labels: list[str], batch_size: int) -> float:
        """One pass over (texts, labels) in mini-batches; returns the mean loss."""
        ids = np.array([self.index[label] for label in labels], dtype=np.int64)
        losses = []
        for start in range(0, len(texts), batch_size):
            loss, rows = self._step(tf.constant(texts[start : start + batch_size]),
                                    tf.constant(ids[start : start + batch_size]))
            self.touched.update(rows.numpy().tolist())
            losses.append(float(loss))
            self.steps += 1
        return float(np.mean(losses)) if losses else float("nan")

    def reset_optimizer(self, rows: set[int]) -> None:
        """Forget what a held-back candidate built in the optimiser: its embedding rows' moments
        and step counts, and the dense weights' Adam state (the weights themselves are restored by
        the caller). Each restarts as a fresh Adam would, bias correction included."""
        if rows:
            index = tf.constant(sorted(rows), dtype=tf.int64)
            zeros = tf.zeros((len(rows), self._emb.shape[1]))
            self._m.scatter_update(tf.IndexedSlices(zeros, index))
            self._v.scatter_update(tf.IndexedSlices(zeros, index))
            self._t.scatter_update(tf.IndexedSlices(tf.zeros(len(rows)), index))
        for var in self._opt.variables:  # Adam's per-weight moments
            if var.path.endswith(("_momentum", "_velocity")):
                var.assign(tf.zeros_like(var))
        self._opt.iterations.assign(0)  # and its step count, so bias correction restarts; the rate stays

    def take_touched(self) -> set[int]:
        touched, self.touched = self.touched, set()
        return touched
