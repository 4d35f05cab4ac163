"""One served model version: the compiled model call and turning probabilities into answers."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from train.model import LoadedModel


class ServedModel:
    """Immutable once built: a replica swaps whole ServedModels, so a batch sees one version."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.version = loaded.version
        self.labels = np.array(loaded.labels, dtype=object)
        self._fn = loaded.predict_fn()
        self._fn(tf.constant(["warm up"]))  # trace now, not on the first request

    def classify(self, texts: list[str], top_ks: list[int]) -> list[dict]:
        """Runs in a worker thread (off the replica's event loop); one model call per batch."""
        probs = self._fn(tf.constant(texts, dtype=tf.string)).numpy()
        k = min(max(top_ks), probs.shape[1])
        top = np.argsort(-probs, axis=1)[:, :k]
        answers = []
        for row, idx, want in zip(probs, top, top_ks):
            ranked = [{"label": self.labels[i], "score": float(row[i])} for i in idx[:want]]
            answers.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked})
        return answers
