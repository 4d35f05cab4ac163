"""A digest of a model's weights that is cheap to keep current as deltas land.

Every replica computes the digest of the weights it actually holds, and the learner of the
weights it publishes; a replica whose digest differs from the one its update named asks for
full weights. Hashing the whole embedding on every publish would take a large share of a publish
interval for a large model (figures: docs/ONLINE_LEARNING.md, "Identity"), so the embedding part
is a sum over rows of a mixed 64-bit hash of each row, weighted by a per-row odd multiplier, modulo 2**64:
a delta touching R rows updates it in O(R * dim). Dense weights (LSTM or Conv1D, output: a few MB
at most) are hashed with BLAKE2b each time.

It detects accidental divergence (another lineage, a lost or doubled delta, a partial load)
with a collision chance of about 2**-64; it is not a defence against someone crafting weights.
"""

from __future__ import annotations

import hashlib

import numpy as np

_CHUNK = 16_384  # rows hashed at a time: bounds the temporary memory for a full hash
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class WeightsDigest:
    """The digest of (embedding rows, dense weights); `update_rows` follows a sparse change."""

    def __init__(self, embedding: np.ndarray, dense: list[np.ndarray]):
        rows, dim = embedding.shape
        rng = np.random.default_rng(dim)  # fixed per shape: every process computes the same digest
        self._cols = rng.integers(1, 2**63, size=dim, dtype=np.uint64) | np.uint64(1)
        self._rows = rng.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
        self._emb = np.uint64(0)
        with np.errstate(over="ignore"):
            for start in range(0, rows, _CHUNK):
                self._emb += self._weighted(np.arange(start, min(rows, start + _CHUNK)), embedding[start : start + _CHUNK])
        self.set_dense(dense)

    def _weighted(self, index: np.ndarray, values: np.ndarray) -> np.uint64:
        with np.errstate(over="ignore"):
            words = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
            row_hash = _mix((words * self._cols).sum(axis=1, dtype=np.uint64))
            return (row_hash * self._rows[index]).sum(dtype=np.uint64)

    def update_rows(self, index: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Rows `index` changed from `old` to `new` (same order)."""
        if len(index):
            with np.errstate(over="ignore"):
                self._emb = self._emb - self._weighted(index, old) + self._weighted(index, new)

    def set_dense(self, dense: list[np.ndarray]) -> None:
        h = hashlib.blake2b(digest_size=16)
        for array in dense:
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        self._dense = h.digest()

    def hexdigest(self) -> str:
        return hashlib.blake2b(int(self._emb).to_bytes(8, "little") + self._dense, digest_size=8).hexdigest()


def model_digest(model) -> WeightsDigest:
    from online_learning.weights import dense_variables, embedding_variable

    return WeightsDigest(embedding_variable(model).numpy(), [v.numpy() for v in dense_variables(model)])
