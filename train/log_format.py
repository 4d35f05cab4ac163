"""The feedback log's on-disk format: segment names, the line format, reading only committed
batches. Below both the learner (online_learning.feedback_log writes it) and a fine-tune
(train.log_reader reads it), so neither imports the other.

A segment `feedback-<first offset, 12 digits>.jsonl` holds dense offsets from its first one up to
the next segment's first. Each line is one JSON record; every record carries `end`, the last
offset of the batch it was appended with. A batch is committed only when its `end` line is
complete on disk, so a reader never yields part of a batch that a crash or a failed write cut
short, and skipping to an offset needs no parsing of the lines before it (one line per offset).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Iterator

LEGACY_FILE = "feedback.jsonl"  # the single-file log of earlier versions: migrated on open
MARKS_FILE = "marks.jsonl"
SEGMENT_RE = re.compile(r"^feedback-(\d{12})\.jsonl$")
SIDECAR_RE = re.compile(r"^feedback-(\d{12})\.ids\.npy$")
STRIDE = 256  # the sparse offset -> byte index keeps one position per STRIDE events


class CorruptLog(RuntimeError):
    """A segment breaks the log's invariants (dense offsets, batch framing): needs an operator."""


class OffsetCompacted(LookupError):
    """A read asked for events that compaction already deleted."""

    def __init__(self, offset: int, first_offset: int):
        super().__init__(f"feedback log offset {offset} was compacted; the log now starts at offset {first_offset}")
        self.offset, self.first_offset = offset, first_offset


class LogWriteError(OSError):
    """Writing or fsyncing the log failed (disk full, file too large, I/O error).

    Nothing of the batch was written or acknowledged: the file is back at its length before the
    call, and the next append works once the cause is gone. `errno` is the OS error."""

    def __init__(self, err: int | None, what: str):
        name = errno.errorcode.get(err or 0, "unknown")
        super().__init__(err, f"{what}: {os.strerror(err) if err else 'unknown error'} ({name})")
        self.errno_name = name


def segment_name(first: int) -> str:
    return f"feedback-{first:012d}.jsonl"


def sidecar_name(first: int) -> str:
    return f"feedback-{first:012d}.ids.npy"


def list_numbered(directory: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), directory / n) for n in names if (m := pattern.match(n))]
    return sorted(found)


def encode(offset: int, end: int, event_id: str, text: str, label: str, ts: float) -> bytes:
    record = {"offset": offset, "event_id": event_id, "text": text, "label": label, "ts": ts, "end": end}
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _record(line: bytes) -> dict | None:
    """The record on `line`, or None when it is not one (a torn write, a page of zeros)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("offset"), int):
        return None
    if not isinstance(record.get("end", record["offset"]), int):
        return None
    if not all(isinstance(record.get(k), str) for k in ("event_id", "text", "label")):
        return None
    return record


def damaged(path, offset: int, good: int, why: str) -> CorruptLog:
    """The error for acknowledged events that cannot be read: says what the operator can do."""
    return CorruptLog(
        f"{path}: acknowledged events from offset {offset} on are damaged ({why}); nothing was changed. "
        f"Restore the state folder from a backup; or, to keep the events before offset {offset} and lose the "
        f"rest of this segment and every later one, stop the learner, cut the file to its first {good} bytes "
        f"(truncate -s {good} {path}), move the later segments away, and start it again")


def _tail_or_raise(f, pending_end: int | None, expected: int, good: int) -> None:
    """After an unreadable line: return if what follows is the rest of one write that never
    finished (so never fsynced, never acknowledged), raise CorruptLog if a later batch follows
    (a batch is written only once the one before it is fsynced and acknowledged).

    A power loss in the middle of a write can leave pages of zeros anywhere in the bytes that write
    added, with complete lines of the same batch after them; all of those carry that batch's
    `end`. Two different `end`s after the last good byte mean a second batch was written."""
    ends = set() if pending_end is None else {pending_end}
    for line in f:
        record = _record(line) if line.endswith(b"\n") else None
        if record is not None:
            ends.add(record.get("end", record["offset"]))
            if len(ends) > 1:
                raise damaged(f.name, expected, good, "an unreadable line is followed by a later complete batch")


def committed(f, expected: int) -> Iterator[tuple[dict, int]]:
    """(record, byte position after its line) for each record of a committed batch, reading `f`
    from its current position, where the record with offset `expected` starts. Stops before a
    torn line, an incomplete batch (a write in flight or cut short) or an unreadable tail that
    only a write that never finished can have left; raises CorruptLog when an unreadable line
    has a later batch after it (acknowledged data is damaged)."""
    pending: list[tuple[dict, int]] = []
    pos = good = f.tell()
    first_pending = expected
    for line in f:
        if not line.endswith(b"\n"):
            return
        pos += len(line)
        record = _record(line)
        if record is None:
            _tail_or_raise(f, pending[0][0].get("end") if pending else None, first_pending, good)
            return
        end = record.get("end", record["offset"])  # earlier versions: one-event batches
        if record["offset"] != expected or end < expected:
            raise damaged(f.name, first_pending, good,
                          f"expected offset {expected}, found {record['offset']} (end {end})")
        expected += 1
        pending.append((record, pos))
        if record["offset"] == end:
            yield from pending
            pending.clear()
            good, first_pending = pos, expected


def scan_positions(path: Path, first: int) -> tuple[list[int], int, int]:
    """Sparse index of a segment: (byte position of offsets first, first+STRIDE, ...), next offset
    after the last committed batch, byte length of the committed part."""
    positions, nxt, good = [], first, 0
    with open(path, "rb") as f:
        for record, after in committed(f, first):
            if (record["offset"] - first) % STRIDE == 0:
                positions.append(good)
            nxt, good = record["offset"] + 1, after
    return positions, nxt, good


def seek(f, first: int, offset: int, positions: list[int] | None) -> int:
    """Position `f` at the line of `offset` (or before it); returns the offset of that line."""
    k = (offset - first) // STRIDE if positions else 0
    if positions and k < len(positions):
        f.seek(positions[k])
        return first + k * STRIDE
    if positions:
        f.seek(positions[-1])
        return first + (len(positions) - 1) * STRIDE
    f.seek(0)
    return first


def write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])  # a short write (limit reached) raises on the next call


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_marks(path: Path) -> tuple[list[dict], int]:
    """The complete records of the marks file and the byte length they take. A last line that is
    torn or unreadable (a mark in flight when the power went: pages of zeros in a line) is left
    out: it was never confirmed to its caller. An unreadable line with a complete mark after it
    raises CorruptLog: marks after it were confirmed, so it was too."""
    records, good = [], 0
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                record = _mark(line)
                if record is None:
                    if any(ln.endswith(b"\n") and _mark(ln) is not None for ln in f):
                        raise CorruptLog(
                            f"{path}: a confirmed mark at byte {good} is unreadable and later marks follow it; "
                            f"nothing was changed. Restore the state folder from a backup; or stop the learner, "
                            f"cut the file to its first {good} bytes (truncate -s {good} {path}) and start it "
                            f"again: the events of the lost marks count as unmarked (held-out events may be "
                            f"trained on, held-back rounds replayed)")
                    break
                records.append(record)
                good += len(line)
    except FileNotFoundError:
        pass
    return records, good


def _mark(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("mark"), str) \
            or not isinstance(record.get("ranges"), list):
        return None
    return record
