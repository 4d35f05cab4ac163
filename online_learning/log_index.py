"""The feedback log's id index: keeps `event_id` idempotency with memory bounded by one segment.

The active segment's ids are a dict in memory. When a segment seals, its ids go to a sidecar
`feedback-<first>.ids.npy`: one uint64 array of 3*n values (id hashes sorted, then the payload
digests and offsets in the same order), 24 bytes per event, read through a memory map. A lookup
binary-searches each sidecar, newest first; a sidecar outlives its segment's compaction, so a
resend of a compacted event is still a duplicate (or a conflict).

Ids are compared by an 8-byte hash in sidecars: two different ids with the same hash read as
the same id. With the same payload that is a duplicate of an identical event (nothing lost);
with another payload the new event is refused as a conflict (HTTP 409, visible to the sender).
The odds for a new id among n ids logged before are n / 2**64 (1e8 ids: 5e-12 per event).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from train.log_format import CorruptLog, committed, fsync_dir, write_all


def id_hash(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def payload_digest(text: str, label: str) -> int:
    """8 bytes that tell two payloads of one id apart (a resend from a conflict)."""
    raw = hashlib.blake2b(f"{text}\x1f{label}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(raw, "little")


class Sidecar:
    def __init__(self, first: int, path: Path, values: np.ndarray):
        n = len(values) // 3
        self.first, self.path, self.n = first, path, n
        self.hashes, self.digests, self.offsets = values[:n], values[n:2 * n], values[2 * n:]

    def lookup(self, hashes: np.ndarray) -> dict[int, tuple[int, int]]:
        """hash -> (offset, digest) for those of `hashes` this segment holds."""
        if not self.n or not len(hashes):
            return {}
        at = np.minimum(np.searchsorted(self.hashes, hashes), self.n - 1)
        hit = self.hashes[at] == hashes
        return {int(h): (int(self.offsets[i]), int(self.digests[i])) for h, i in zip(hashes[hit], at[hit])}


def write_sidecar(directory: Path, first: int, name: str, ids: dict[str, tuple[int, int]]) -> Sidecar:
    """Write the sidecar of a sealed segment durably (temp file, fsync, rename, fsync folder)."""
    n = len(ids)
    hashes = np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=n)
    digests = np.fromiter((d for _, d in ids.values()), dtype=np.uint64, count=n)
    offsets = np.fromiter((o for o, _ in ids.values()), dtype=np.uint64, count=n)
    return _write(directory, first, name, hashes, digests, offsets)


def merge_sidecars(directory: Path, name: str, run: list[Sidecar]) -> Sidecar:
    """One sidecar for the consecutive sidecars `run` (oldest first), written under the name of
    the first; the others are deleted after. A crash in between leaves duplicates, which agree."""
    merged = _write(directory, run[0].first, name, *(np.concatenate([getattr(s, f) for s in run])
                                                     for f in ("hashes", "digests", "offsets")))
    for sidecar in run[1:]:
        sidecar.path.unlink(missing_ok=True)
    fsync_dir(directory)
    return merged


def _write(directory: Path, first: int, name: str, hashes, digests, offsets) -> Sidecar:
    n = len(hashes)
    order = np.argsort(hashes, kind="stable")
    values = np.concatenate([hashes[order], digests[order], offsets[order]])
    path, tmp = directory / name, directory / (name + ".tmp")
    buffer = io.BytesIO()
    np.save(buffer, values)  # into memory: numpy's own file writes ignore a short write (EFBIG)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, buffer.getvalue())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar = load_sidecar(first, path, n)
    if sidecar is None:
        raise OSError(errno.EIO, f"{path} reads back wrong")
    return sidecar


def load_sidecar(first: int, path: Path, expected: int | None) -> Sidecar | None:
    """The sidecar, or None when it is missing, unreadable or not of the expected length."""
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if values.dtype != np.uint64 or values.ndim != 1 or len(values) % 3:
        return None
    if expected is not None and len(values) // 3 != expected:
        return None
    return Sidecar(first, path, values)


def segment_ids(path: Path, first: int) -> tuple[dict[str, tuple[int, int]], int]:
    """event_id -> (offset, digest) of a sealed segment, by reading it; and its next offset."""
    ids, nxt = {}, first
    with open(path, "rb") as f:
        for record, _ in committed(f, first):
            ids[record["event_id"]] = (record["offset"], payload_digest(record["text"], record["label"]))
            nxt = record["offset"] + 1
    if path.stat().st_size and nxt == first:
        raise CorruptLog(f"{path}: a sealed segment without a committed batch")
    return ids, nxt
