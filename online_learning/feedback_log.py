"""The durable feedback log: append-only JSON lines, fsynced before an event is acknowledged.

Each accepted event gets the next offset (0, 1, 2, ...). The log is the source of truth: the
learner's state is "snapshot at offset X + replay of every event after X". Appending is
idempotent on `event_id`: a resend of the same event returns the offset it already has and
writes nothing; the same id with another text or label is a conflict (EventIdConflict), never
silently dropped, and nothing of its batch is written.

The embedded default is one file on local disk. On a cluster the learner may restart on another
node, so the folder must be on storage every node sees (NFS, a mounted volume); see
docs/ONLINE_LEARNING.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOG_FILE = "feedback.jsonl"


@dataclass(frozen=True)
class FeedbackEvent:
    event_id: str
    text: str
    label: str


@dataclass(frozen=True)
class LoggedEvent:
    offset: int
    event_id: str
    text: str
    label: str
    ts: float


class EventIdConflict(ValueError):
    """An event_id already names another (text, label): the client must pick a new id."""

    def __init__(self, event_id: str, offset: int):
        super().__init__(f"event_id {event_id!r} is already used (offset {offset}) by an event with another text or label")
        self.event_id, self.offset = event_id, offset


def _digest(text: str, label: str) -> bytes:
    """8 bytes that tell two payloads of one id apart (a resend from a conflict)."""
    return hashlib.blake2b(f"{text}\x1f{label}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


class FeedbackLog:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}  # event_id -> offset, rebuilt from the file on open
        self._digests: dict[str, bytes] = {}  # event_id -> digest of (text, label)
        self._next = 0
        self._recover()
        self._file = open(self.path, "ab")

    def _recover(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a torn last write: it was never fsynced, so never acknowledged
                record = json.loads(line)
                self._offsets[record["event_id"]] = record["offset"]
                self._digests[record["event_id"]] = _digest(record["text"], record["label"])
                self._next = record["offset"] + 1
                good_bytes += len(line)
        if good_bytes < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)

    def __len__(self) -> int:
        return self._next

    def append(self, events: list[FeedbackEvent]) -> list[tuple[int, bool]]:
        """Write new events durably; returns (offset, was_duplicate) per event, in order.

        Raises EventIdConflict (writing nothing) if an id comes with another text or label than
        the one it already has, in the log or earlier in `events`."""
        out, lines, now = [], [], time.time()
        with self._lock:
            fresh: dict[str, int] = {}
            fresh_digests: dict[str, bytes] = {}
            for ev in events:
                digest = _digest(ev.text, ev.label)
                known = self._offsets.get(ev.event_id, fresh.get(ev.event_id))
                if known is not None:
                    if self._digests.get(ev.event_id, fresh_digests.get(ev.event_id)) != digest:
                        raise EventIdConflict(ev.event_id, known)
                    out.append((known, True))
                    continue
                offset = self._next + len(fresh)
                fresh[ev.event_id], fresh_digests[ev.event_id] = offset, digest
                record = {"offset": offset, "event_id": ev.event_id, "text": ev.text, "label": ev.label, "ts": now}
                lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                out.append((offset, False))
            if lines:
                self._file.write(b"".join(lines))
                self._file.flush()
                os.fsync(self._file.fileno())  # durable before anyone is told "accepted"
                self._offsets.update(fresh)
                self._digests.update(fresh_digests)
                self._next += len(fresh)
        return out

    def read_from(self, offset: int) -> list[LoggedEvent]:
        """Every event with offset >= `offset`, in order."""
        events = []
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                record = json.loads(line)
                if record["offset"] >= offset:
                    events.append(LoggedEvent(**record))
        return events

    def close(self) -> None:
        self._file.close()
