"""Reading the feedback log the online learner writes: `FeedbackLogReader`, read-only.

A fine-tune (train/job.py) reads the log with it while the learner may be appending; the learner's
writer (online_learning.feedback_log.FeedbackLog) shares `LogView` for its own reads. The format is
train/log_format.py's. Public: FeedbackLogReader, LoggedEvent, MARKS, OffsetCompacted, CorruptLog.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from train.log_format import (
    LEGACY_FILE,
    MARKS_FILE,
    SEGMENT_RE,
    STRIDE,
    CorruptLog,
    OffsetCompacted,
    committed,
    damaged,
    list_numbered,
    parse_marks,
    scan_positions,
    seek,
)

__all__ = ["FeedbackLogReader", "LoggedEvent", "LogView", "MARKS", "OffsetCompacted", "CorruptLog", "marks_from"]

MARKS = ("holdout", "rejected", "deferred")


@dataclass(frozen=True)
class LoggedEvent:
    offset: int
    event_id: str
    text: str
    label: str
    ts: float
    holdout: bool = False  # the gate held it out of training
    rejected: bool = False  # its round was held back by the gate as harmful: never trained on
    deferred: bool = False  # its round was held back on the base check alone: the learner does not
    # replay it, a fine-tune (all base data, several epochs) still learns it


def marks_from(records: list[dict], floor: int) -> dict[str, set[int]]:
    marks: dict[str, set[int]] = {m: set() for m in MARKS}
    for record in records:
        target = marks.setdefault(record["mark"], set())
        for start, stop in record["ranges"]:
            target.update(range(max(start, floor), stop))
    return marks


class LogView:
    """Reading, shared by the writer and the read-only reader."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._sparse: dict[int, list[int]] = {}  # first offset -> byte positions every STRIDE events

    def _view(self) -> tuple[list[tuple[int, Path]], int | None, dict[str, set[int]]]:
        raise NotImplementedError

    def _positions(self, first: int, path: Path, sealed: bool, want: int) -> list[int] | None:
        if first in self._sparse:
            return self._sparse[first]
        if not sealed or want - first < STRIDE:
            return None
        positions, _, _ = scan_positions(path, first)  # once per sealed segment: it never changes
        self._sparse[first] = positions
        return positions

    def _list_segments(self) -> list[tuple[int, Path]]:
        segments = list_numbered(self.directory, SEGMENT_RE)
        if not segments and (self.directory / LEGACY_FILE).exists():
            segments = [(0, self.directory / LEGACY_FILE)]
        return segments

    @property
    def first_offset(self) -> int:
        """The oldest offset still in the log (0 until a compaction deletes a segment)."""
        segments = self._view()[0]
        return segments[0][0] if segments else 0

    def read_from(self, offset: int, limit: int | None = None) -> list[LoggedEvent]:
        """The events with offset >= `offset`, in order, at most `limit` of them."""
        return list(self.iter_from(offset, limit))

    def iter_from(self, offset: int, limit: int | None = None) -> Iterator[LoggedEvent]:
        """Iterate the committed events with offset >= `offset` (at most `limit`), opening only the
        segments that hold them. Raises OffsetCompacted (now, not when iterated) if `offset` is
        below `first_offset`. A writer's iterator stops at the length the log had when called."""
        segments, stop, marks = self._view()
        if not segments or limit == 0 or (stop is not None and offset >= stop):
            return iter(())
        if offset < segments[0][0]:
            raise OffsetCompacted(offset, segments[0][0])
        return self._events(segments, stop, marks, max(offset, 0), limit)

    def _events(self, segments, stop, marks, offset, limit) -> Iterator[LoggedEvent]:
        holdout, rejected, deferred = (marks.get(m, set()) for m in MARKS)
        i = max(bisect_right([f for f, _ in segments], offset) - 1, 0)
        given, nxt = 0, None
        while True:
            for j in range(i, len(segments)):
                first, path = segments[j]
                if nxt is not None and nxt != first:
                    prev = segments[j - 1][1]
                    raise damaged(prev, nxt, scan_positions(prev, segments[j - 1][0])[2],
                                  f"it ends at offset {nxt} but the next segment starts at {first}")
                want = max(offset, first)
                try:
                    f = open(path, "rb")
                    positions = self._positions(first, path, j < len(segments) - 1, want)
                except FileNotFoundError:
                    raise OffsetCompacted(want, self.first_offset) from None
                with f:
                    nxt = seek(f, first, want, positions)
                    for record, _ in committed(f, nxt):
                        off = record["offset"]
                        if stop is not None and off >= stop:
                            return
                        nxt = off + 1
                        if off < offset:
                            continue
                        yield LoggedEvent(off, record["event_id"], record["text"], record["label"], record["ts"],
                                          off in holdout, off in rejected, off in deferred)
                        given += 1
                        if limit is not None and given >= limit:
                            return
            if stop is not None:
                return
            newer = [s for s in self._list_segments() if s[0] >= nxt]  # a reader follows a rotation
            if not newer or newer[0][0] != nxt:
                return
            segments, i = newer, 0


class FeedbackLogReader(LogView):
    """A read-only view of a log another process writes: never writes, truncates or creates a
    file. It stops before a torn line or an incomplete batch (the writer's write in flight), so
    it always sees a prefix of the log. Marks are read when an iteration starts."""

    def _view(self):
        segments = self._list_segments()
        floor = segments[0][0] if segments else 0
        return segments, None, marks_from(parse_marks(self.directory / MARKS_FILE)[0], floor)

    @property
    def next_offset(self) -> int:
        """One past the last committed event now on disk."""
        segments = self._list_segments()
        if not segments:
            return 0
        first, path = segments[-1]
        return scan_positions(path, first)[1]

    def __len__(self) -> int:
        return self.next_offset
