"""The durable feedback log: append-only JSON lines in segment files, fsynced before an event is
acknowledged.

Over ~400 lines on purpose: append, recovery on open, marks and compaction share one set of
crash-consistency invariants (what is on disk after a failure at any byte), kept in one file
so they are read and changed together.

Each accepted event gets the next offset (0, 1, 2, ...), dense across segments. The log is the
source of truth: the learner's state is "snapshot at offset X + replay of every event after X".
Appending is idempotent on `event_id`: a resend of the same event returns the offset it already
has and writes nothing; the same id with another text or label is a conflict (EventIdConflict),
never silently dropped, and nothing of its batch is written. A failed write (disk full, I/O
error) truncates the segment back and raises LogWriteError: nothing of the batch is kept.

One process writes (`FeedbackLog`, the learner), enforced by the state folder's ownership lease
and epoch (persistence.py): a second writer is refused, and one that lost ownership writes no
byte more. Others read with `FeedbackLogReader` (train/log_reader.py), which never writes,
truncates or creates anything. Segments rotate at `segment_events` events or
`segment_bytes` bytes; `compact(below_offset)` deletes whole segments below an offset; the ids of
deleted segments stay in small sidecar indexes (log_index.py), so resends stay duplicates.
`mark(offsets, "holdout" | "rejected" | "deferred")` annotates events in `marks.jsonl`.

The folder must be on storage every node sees when the learner may restart on another node (NFS,
a mounted volume); see docs/ONLINE_LEARNING.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from online_learning.log_index import (
    Sidecar,
    id_hash,
    load_sidecar,
    merge_sidecars,
    payload_digest,
    segment_ids,
    write_sidecar,
)
from train.log_format import (
    LEGACY_FILE,
    MARKS_FILE,
    SEGMENT_RE,
    SIDECAR_RE,
    STRIDE,
    CorruptLog,
    LogWriteError,
    OffsetCompacted,
    committed,
    damaged,
    encode,
    fsync_dir,
    list_numbered,
    parse_marks,
    scan_positions,
    segment_name,
    sidecar_name,
    write_all,
)
from train.log_reader import MARKS, FeedbackLogReader, LoggedEvent, LogView, marks_from

from online_learning.persistence import NotOwner, Ownership
from online_learning.protocol import FeedbackEvent

__all__ = ["FeedbackEvent", "LoggedEvent", "FeedbackLog", "FeedbackLogReader", "EventIdConflict", "LogWriteError",
           "OffsetCompacted", "CorruptLog", "MARKS", "NotOwner"]

logger = logging.getLogger(__name__)
MERGE_FAN_IN = 8  # id indexes of compacted segments merge 8 of one size class into one ...
MERGE_MAX_IDS = 1 << 20  # ... up to 1M ids (24 MB): lookups search O(8 log8 n) files, not one per segment


class EventIdConflict(ValueError):
    """An event_id already names another (text, label): the client must pick a new id."""

    def __init__(self, event_id: str, offset: int):
        super().__init__(f"event_id {event_id!r} is already used (offset {offset}) by an event with another text or label")
        self.event_id, self.offset = event_id, offset


def _ranges(offsets: list[int]) -> list[list[int]]:
    """Sorted offsets as [start, stop) ranges."""
    out: list[list[int]] = []
    for o in offsets:
        if out and out[-1][1] == o:
            out[-1][1] = o + 1
        else:
            out.append([o, o + 1])
    return out


class FeedbackLog(LogView):
    """The writer: one per state folder, enforced. Thread-safe.

    It writes only while `owner` (online_learning.persistence.Ownership) owns the folder, checked
    before every write; without one it takes the folder's lease itself (raising NotOwner when
    another process holds it) and gives it up on `close`."""

    def __init__(self, directory: str | Path, *, segment_events: int = 50_000, segment_bytes: int = 64 << 20,
                 retain_events: int = 100_000, owner: Ownership | None = None):
        super().__init__(directory)
        if segment_events < 1 or segment_bytes < 1 or retain_events < 0:
            raise ValueError("segment_events and segment_bytes must be >= 1, retain_events >= 0")
        self.segment_events, self.segment_bytes, self.retain_events = segment_events, segment_bytes, retain_events
        self._own_lease = owner is None
        if owner is None:
            owner = Ownership(self.directory)
            if not owner.try_acquire():
                epoch = owner.current_epoch()
                raise NotOwner(f"{self.directory} is owned by another process (epoch {epoch}); one writer at a time",
                               epoch)
        self.owner = owner
        try:
            self._open()
        except BaseException:
            if self._own_lease:
                owner.release()
            raise

    def _open(self) -> None:
        self.owner.check()  # opening repairs files: an owner's job
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._torn: dict[int, int] = {}  # fd -> length it must be truncated to before the next write
        self._migrate_legacy()
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()
        self._segments = list_numbered(self.directory, SEGMENT_RE)
        if not self._segments:
            os.close(os.open(self.directory / segment_name(0), os.O_WRONLY | os.O_CREAT, 0o644))
            fsync_dir(self.directory)
            self._segments = [(0, self.directory / segment_name(0))]
        self._sidecars: list[Sidecar] = self._open_sidecars()  # newest first
        records, good = parse_marks(self.directory / MARKS_FILE)
        self._marks = marks_from(records, self._segments[0][0])
        self._recover_active(self._acknowledged_floor(records))
        self._fd = os.open(self._segments[-1][1], os.O_WRONLY | os.O_APPEND)
        self._marks_fd = os.open(self.directory / MARKS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._marks_fd).st_size > good:  # a torn mark: never confirmed to its caller
            os.ftruncate(self._marks_fd, good)
            os.fsync(self._marks_fd)
        self._marks_size = good

    # -- opening ---------------------------------------------------------------------------------

    def _migrate_legacy(self) -> None:
        legacy = self.directory / LEGACY_FILE
        if not legacy.exists():
            return
        if list_numbered(self.directory, SEGMENT_RE):
            raise CorruptLog(f"{self.directory} has both {LEGACY_FILE} and segment files; move one of them away")
        os.rename(legacy, self.directory / segment_name(0))  # its offsets start at 0: it is the first segment
        fsync_dir(self.directory)
        logger.info("feedback log %s: migrated %s to %s", self.directory, LEGACY_FILE, segment_name(0))

    def _open_sidecars(self) -> list[Sidecar]:
        sidecars = []
        firsts = [f for f, _ in self._segments]
        active = firsts[-1]
        for first, path in list_numbered(self.directory, SIDECAR_RE):
            if first == active:  # written by a seal that did not finish: the segment is still active
                path.unlink()
            elif first < firsts[0]:  # its segment was compacted: the ids are all that is left
                sidecar = load_sidecar(first, path, None)
                if sidecar is None:
                    logger.warning("feedback log: unreadable id index %s; resends of its events are new events", path)
                else:
                    sidecars.append(sidecar)
        for k, (first, path) in enumerate(self._segments[:-1]):
            expected = firsts[k + 1] - first
            sidecar = load_sidecar(first, self.directory / sidecar_name(first), expected)
            if sidecar is None:  # missing or damaged: rebuild it from the segment
                ids, nxt = segment_ids(path, first)
                if nxt != firsts[k + 1]:
                    # a segment is sealed only after its last batch was acknowledged: damage
                    raise damaged(path, nxt, scan_positions(path, first)[2],
                                  f"the segment ends at offset {nxt} but the next one starts at {firsts[k + 1]}")
                sidecar = write_sidecar(self.directory, first, sidecar_name(first), ids)
            sidecars.append(sidecar)
        return sorted(sidecars, key=lambda s: s.first, reverse=True)

    def _acknowledged_floor(self, mark_records: list[dict]) -> int:
        """The highest offset known to have been acknowledged: marked (a mark follows judging, which
        follows the acknowledgement), or named by the learner's state file as applied or judged.
        A tail that looks unfinished but reaches it was acknowledged: damaged, not unfinished."""
        from train.learner_state import read_state

        marked = max((stop - 1 for record in mark_records for _, stop in record["ranges"]), default=-1)
        state = read_state(self.directory)
        named = max(state.log_offset, state.judged_offset) if state is not None else -1
        return max(marked, named)

    def _recover_active(self, acknowledged: int = -1) -> None:
        first, path = self._segments[-1]
        ids, positions, nxt, good = {}, [], first, 0
        with open(path, "rb") as f:
            for record, after in committed(f, first):
                off = record["offset"]
                if (off - first) % STRIDE == 0:
                    positions.append(good)
                ids[record["event_id"]] = (off, payload_digest(record["text"], record["label"]))
                nxt, good = off + 1, after
        size = path.stat().st_size
        if good < size and acknowledged >= nxt:  # the "unfinished" tail holds events known acknowledged
            raise damaged(path, nxt, good, f"offset {acknowledged} was marked or recorded as learned, "
                          f"but the log's readable events end at offset {nxt - 1}")
        if good < size:  # a torn batch or a zero page: never fsynced whole, so never acknowledged
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
            logger.warning("feedback log %s: dropped an unfinished last write (%d bytes after offset %d)",
                           path.name, size - good, nxt - 1)
        self._ids: dict[str, tuple[int, int]] = ids  # the active segment's id -> (offset, digest)
        self._sparse[first] = positions
        self._next, self._size = nxt, good

    # -- state -----------------------------------------------------------------------------------

    def _view(self):
        with self._lock:
            return list(self._segments), self._next, self._marks

    def __len__(self) -> int:
        return self._next

    @property
    def active_path(self) -> Path:
        return self._segments[-1][1]

    def stats(self) -> dict:
        """Figures for /v1/model and the docs: offsets, segments, ids in memory, bytes on disk."""
        with self._lock:
            disk = sum(e.stat().st_size for e in os.scandir(self.directory) if e.is_file())
            return {"first_offset": self._segments[0][0], "next_offset": self._next, "segments": len(self._segments),
                    "id_indexes": len(self._sidecars), "ids_in_memory": len(self._ids),
                    "marks": {m: len(s) for m, s in self._marks.items()}, "disk_bytes": disk}

    # -- writing ---------------------------------------------------------------------------------

    def _repair(self) -> None:
        for fd, length in list(self._torn.items()):
            try:
                os.ftruncate(fd, length)
                os.fsync(fd)
            except OSError as err:
                raise LogWriteError(err.errno, "the feedback log could not be cut back after a failed write") from err
            del self._torn[fd]

    def _write(self, fd: int, length: int, data: bytes, what: str) -> None:
        """Write and fsync `data` at the end of the file `fd` (now `length` bytes), or leave it as
        it was and raise LogWriteError."""
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, length)
                os.fsync(fd)
            except OSError:
                self._torn[fd] = length  # retried before the next write
            raise LogWriteError(err.errno, f"{what} failed; nothing of it was kept") from err

    def _maybe_seal(self) -> None:
        if not self._ids or (len(self._ids) < self.segment_events and self._size < self.segment_bytes):
            return
        first, path = self._segments[-1]
        new_path = self.directory / segment_name(self._next)
        try:
            sidecar = write_sidecar(self.directory, first, sidecar_name(first), self._ids)
            fd = os.open(new_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fsync_dir(self.directory)
            except OSError:
                os.close(fd)
                raise
        except OSError as err:
            raise LogWriteError(err.errno, f"sealing feedback log segment {path.name} failed") from err
        os.close(self._fd)
        self._fd = fd
        self._sidecars.insert(0, sidecar)
        self._segments.append((self._next, new_path))
        self._sparse[self._next] = []
        self._ids, self._size = {}, 0

    def _lookup_sealed(self, ids: list[str]) -> dict[str, tuple[int, int]]:
        if not self._sidecars or not ids:
            return {}
        hashes = np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))
        found: dict[int, tuple[int, int]] = {}
        for sidecar in self._sidecars:  # newest first
            for h, hit in sidecar.lookup(hashes).items():
                found.setdefault(h, hit)
        return {i: found[h] for i, h in zip(ids, hashes.tolist()) if h in found}

    def append(self, events: list[FeedbackEvent]) -> list[tuple[int, bool]]:
        """Write new events durably; returns (offset, was_duplicate) per event, in order.

        Raises EventIdConflict (writing nothing) if an id comes with another text or label than
        the one it already has, in the log or earlier in `events`; LogWriteError (writing
        nothing) if the disk refuses the write; UnicodeEncodeError for text UTF-8 cannot hold."""
        now = time.time()
        with self._lock:
            sealed = self._lookup_sealed(list(dict.fromkeys(e.event_id for e in events if e.event_id not in self._ids)))
            out, new, fresh = [], [], {}
            for ev in events:
                digest = payload_digest(ev.text, ev.label)
                known = self._ids.get(ev.event_id) or sealed.get(ev.event_id) or fresh.get(ev.event_id)
                if known is not None:
                    if known[1] != digest:  # offset None: the clash is inside this request
                        raise EventIdConflict(ev.event_id, None if ev.event_id in fresh else known[0])
                    out.append((known[0], True))
                    continue
                fresh[ev.event_id] = (self._next + len(new), digest)
                out.append((self._next + len(new), False))
                new.append(ev)
            if not new:
                return out
            self.owner.check()
            self._repair()
            self._maybe_seal()  # only when something is written: a refused batch changes no file
            end = self._next + len(new) - 1
            lines = [encode(self._next + k, end, ev.event_id, ev.text, ev.label, now) for k, ev in enumerate(new)]
            self._write(self._fd, self._size, b"".join(lines), "appending to the feedback log")
            first, positions, pos = self._segments[-1][0], self._sparse[self._segments[-1][0]], self._size
            for k, line in enumerate(lines):
                if (self._next + k - first) % STRIDE == 0:
                    positions.append(pos)
                pos += len(line)
            self._ids.update(fresh)
            self._next, self._size = end + 1, pos
        return out

    def mark(self, offsets: Iterable[int], mark: str) -> int:
        """Record durably that these events were held out by the gate (`"holdout"`) or belong to a
        round the gate held back, as harmful (`"rejected"`) or on the base check alone
        (`"deferred"`); readers see LoggedEvent.holdout/.rejected/.deferred.
        Offsets already compacted are skipped. Returns how many offsets were newly marked.
        Raises ValueError for an unknown mark or an offset not in the log, LogWriteError if the
        write fails (nothing kept)."""
        if mark not in MARKS:
            raise ValueError(f"unknown mark {mark!r}; one of {MARKS}")
        with self._lock:
            wanted = sorted({int(o) for o in offsets})
            if wanted and (wanted[0] < 0 or wanted[-1] >= self._next):
                raise ValueError(f"offsets {wanted[0]}..{wanted[-1]} are not all in the log (0..{self._next - 1})")
            floor, done = self._segments[0][0], self._marks[mark]
            wanted = [o for o in wanted if o >= floor and o not in done]
            if not wanted:
                return 0
            data = json.dumps({"mark": mark, "ranges": _ranges(wanted)}).encode() + b"\n"
            self.owner.check()
            self._repair()
            self._write(self._marks_fd, self._marks_size, data, f"marking events {mark}")
            self._marks_size += len(data)
            done.update(wanted)
        return len(wanted)

    def compact(self, below_offset: int) -> int:
        """Delete whole segments whose events all lie below min(below_offset, len - retain_events);
        the active segment is never deleted, and the segments' id indexes are kept (24 bytes per
        event) so resends of deleted events stay duplicates. Drops the marks of deleted events.
        Returns how many events were deleted."""
        with self._lock:
            cutoff = min(below_offset, self._next - self.retain_events)
            before = self._segments[0][0]
            if len(self._segments) > 1 and self._segments[1][0] <= cutoff:
                self.owner.check()
            while len(self._segments) > 1 and self._segments[1][0] <= cutoff:
                first, path = self._segments.pop(0)
                path.unlink(missing_ok=True)
                self._sparse.pop(first, None)
            floor = self._segments[0][0]
            if floor == before:
                return 0
            fsync_dir(self.directory)
            try:
                self._merge_sidecars()
            except OSError as err:  # lookups stay right, only slower: retried next time
                logger.warning("feedback log: could not merge id indexes: %s", err)
            for done in self._marks.values():
                done.difference_update([o for o in done if o < floor])
            try:
                self._rewrite_marks()
            except OSError as err:  # the old marks stay on disk: harmless, retried next time
                logger.warning("feedback log: could not rewrite %s after compaction: %s", MARKS_FILE, err)
            logger.info("feedback log: compacted offsets %s..%s", before, floor - 1)
            return floor - before

    def _merge_sidecars(self) -> None:
        """Size-tiered merging of the compacted segments' id indexes (segments still on disk keep
        one index each): bounds the number of files a lookup searches."""
        def size_class(sidecar: Sidecar) -> int:
            return round(math.log(max(sidecar.n, 1) / self.segment_events, MERGE_FAN_IN))

        while True:
            old = sorted((s for s in self._sidecars if s.first < self._segments[0][0]), key=lambda s: s.first)
            run = next((old[k:k + MERGE_FAN_IN] for k in range(len(old) - MERGE_FAN_IN + 1)
                        if len({size_class(s) for s in old[k:k + MERGE_FAN_IN]}) == 1
                        and sum(s.n for s in old[k:k + MERGE_FAN_IN]) <= MERGE_MAX_IDS), None)
            if run is None:
                return
            merged = merge_sidecars(self.directory, sidecar_name(run[0].first), run)
            gone = {id(s) for s in run}
            self._sidecars = sorted([s for s in self._sidecars if id(s) not in gone] + [merged],
                                    key=lambda s: s.first, reverse=True)

    def _rewrite_marks(self) -> None:
        path, tmp = self.directory / MARKS_FILE, self.directory / (MARKS_FILE + ".tmp")
        data = b"".join(json.dumps({"mark": m, "ranges": _ranges(sorted(done))}).encode() + b"\n"
                        for m, done in self._marks.items() if done)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.directory)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._torn.pop(self._marks_fd, None)  # the new file replaces a torn one
        os.close(self._marks_fd)
        self._marks_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._marks_size = len(data)

    def close(self) -> None:
        """Idempotent: a second call closes nothing (the fd numbers may belong to others by then)."""
        with self._lock:
            for fd in (self._fd, self._marks_fd):
                if fd < 0:
                    continue
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fd = self._marks_fd = -1
            if self._own_lease:
                self.owner.release()
