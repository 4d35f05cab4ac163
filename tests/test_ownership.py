"""One owner per state_dir, tried on real processes: the real FeedbackLog and ownership classes
in separate Python processes on one folder, killed with SIGKILL by PID, fenced by a newer epoch.
Outcomes are checked on disk (the log's bytes, what a reader and a reopened writer see).
Ray-free: nothing here starts Ray or Serve."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from online_learning.feedback_log import FeedbackEvent, FeedbackLog, NotOwner
from online_learning.persistence import EPOCH_FILE, LOCK_FILE, Ownership, StateFile, read_epoch
from train.learner_state import LearnerState, read_state
from train.log_reader import FeedbackLogReader

ROOT = Path(__file__).resolve().parent.parent

# A writer process: waits for the lease (a standby), then appends batches of 4 events, recording
# each acknowledged (id, offset) in its ack file only after `append` returned. It marks and
# compacts now and then, as the learner does. With a batch count it stops after that many
# batches (and first resends the ids in `resend`, which must come back as duplicates); without
# one it runs until killed. It also obeys commands on stdin after its batches.
_WRITER = r"""
import json, sys, threading
from online_learning.feedback_log import FeedbackEvent, FeedbackLog, NotOwner
from online_learning.persistence import Ownership, StateFile
from train.learner_state import LearnerState

directory, name, acks_path, batches, resend = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
owner = Ownership(directory)
if not owner.try_acquire():
    print("STANDBY", flush=True)
    owner.acquire(threading.Event(), 0.02)
log = FeedbackLog(directory, owner=owner, segment_events=40, retain_events=80)
print(f"OWNER {owner.epoch}", flush=True)
acks = open(acks_path, "a")

def record(events, results):
    acks.write("".join(json.dumps([e.event_id, off, dup]) + "\n" for e, (off, dup) in zip(events, results)))
    acks.flush()

if resend:
    again = [FeedbackEvent(i, f"text {i}", "L") for i in json.loads(resend)]
    record(again, log.append(again))
k = 0
while batches < 0 or k < batches:
    events = [FeedbackEvent(f"{name}-{4 * k + j}", f"text {name}-{4 * k + j}", "L") for j in range(4)]
    try:
        record(events, log.append(events))
        if k % 5 == 4:
            log.mark([len(log) - 1], "holdout")
        if k % 25 == 24:
            log.compact(len(log) - 100)
    except NotOwner as err:
        print("FENCED " + str(err), flush=True)
        sys.exit(3)
    k += 1
print("DONE", flush=True)
state = StateFile(owner)
for line in sys.stdin:
    try:
        if line.strip() == "append":
            log.append([FeedbackEvent(f"{name}-late", "late", "L")])
        elif line.strip() == "mark":
            log.mark([len(log) - 1], "rejected")
        elif line.strip() == "compact":
            log.compact(len(log))
        elif line.strip() == "state":
            state.write(LearnerState(version=999, epoch=owner.epoch))
        print("WROTE", flush=True)
    except NotOwner as err:
        print("FENCED " + str(err), flush=True)
"""


class Writer:
    """A writer process and its stdout, read line by line on a thread (waits have deadlines)."""

    def __init__(self, directory: Path, name: str, batches: int = -1, resend: list[str] | None = None):
        self.acks = directory.parent / f"{name}.acks"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory), name, str(self.acks), str(batches),
             json.dumps(resend) if resend else ""],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} from {self.proc.args[3:5]} in {timeout}s; saw {self.seen}; "
                             f"stderr: {self._stderr()}")

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def command(self, what: str) -> str:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.wait_for("", timeout=30)

    def acked(self) -> list[tuple[str, int, bool]]:
        """What this writer acknowledged: complete lines only (a SIGKILL may cut the last one)."""
        if not self.acks.exists():
            return []
        text = self.acks.read_text()
        return [tuple(json.loads(line)) for line in text.split("\n")[:-1]]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def disk(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_second_writer_waits_and_takes_over_with_a_higher_epoch_when_the_first_is_killed(tmp_path):
    """A owns the log and appends without pause; a second writer in this process is refused and a
    standby process B does not get in while A lives. A is killed with SIGKILL mid-stream: B takes
    over under epoch 2, and every event either acknowledged is in the log exactly once, at the
    offset it was acknowledged with; the log reopens."""
    d = tmp_path / "state"
    a = Writer(d, "a")
    b = None
    try:
        assert a.wait_for("OWNER") == "OWNER 1"
        wait_until(lambda: len(a.acked()) >= 40, 60, "A's first acknowledged events")
        with pytest.raises(NotOwner, match="owned by another process"):
            FeedbackLog(d)
        assert not Ownership(d).try_acquire()
        b = Writer(d, "b", batches=60, resend=None)
        b.wait_for("STANDBY")
        # While A lives (and keeps appending), B stays a standby.
        seen = len(a.acked())
        wait_until(lambda: len(a.acked()) >= seen + 100, 60, "A appending while B stands by")
        assert b.lines.empty() and b.proc.poll() is None, b.seen
        a.kill()
        from_a = a.acked()
        assert len(from_a) >= 140
        assert b.wait_for("OWNER") == "OWNER 2"
        assert b.wait_for("DONE") == "DONE"
    finally:
        a.stop()
        if b is not None:
            b.stop()
    assert read_epoch(d) == 2
    from_b = b.acked()
    assert len(from_b) == 240 and not any(dup for _, _, dup in from_b)
    # Resends of A's events, by a third owner, come back as duplicates at the offsets A acknowledged.
    c = Writer(d, "c", batches=1, resend=[i for i, _, _ in from_a[-8:]])
    try:
        assert c.wait_for("OWNER") == "OWNER 3"
        c.wait_for("DONE")
    finally:
        c.stop()
    assert c.acked()[:8] == [(i, off, True) for i, off, _ in from_a[-8:]]
    acknowledged = {i: off for i, off, _ in from_a + from_b + c.acked()}
    events = FeedbackLogReader(d).read_from(FeedbackLogReader(d).first_offset)
    by_id: dict[str, list[int]] = {}
    for e in events:
        by_id.setdefault(e.event_id, []).append(e.offset)
    assert [e.offset for e in events] == list(range(events[0].offset, events[0].offset + len(events)))
    for event_id, offset in acknowledged.items():
        if offset >= events[0].offset:  # below: compacted by an owner, its id kept for resends
            assert by_id.get(event_id) == [offset], event_id
    assert all(len(offsets) == 1 for offsets in by_id.values())
    reopened = FeedbackLog(d)
    try:
        assert len(reopened) == events[-1].offset + 1
        assert reopened.owner.epoch == 4
        # Every acknowledged id, compacted or not, is still known: a resend is a duplicate.
        sample = [(i, off) for i, off in list(acknowledged.items())[::7]]
        assert reopened.append([FeedbackEvent(i, f"text {i}", "L") for i, _ in sample]) == [
            (off, True) for _, off in sample]
    finally:
        reopened.close()


@pytest.mark.parametrize("how", ["lock file removed", "epoch raised elsewhere"])
def test_a_superseded_owner_cannot_write_one_more_byte(tmp_path, how):
    """A owner that lost ownership, while still running: because its lock file was removed and a
    new owner took a fresh one (an operator's rm, a lease the filesystem let expire), or because
    another host raised the epoch on a filesystem that does not honour the lock. Its appends,
    marks, compaction and state-file writes are all refused, and not one byte changes on disk."""
    d = tmp_path / "state"
    a = Writer(d, "a", batches=30)
    try:
        assert a.wait_for("OWNER") == "OWNER 1"
        a.wait_for("DONE")
        assert a.command("state") == "WROTE"  # the owner may write the state file
        if how == "lock file removed":
            (d / LOCK_FILE).unlink()
            b = Writer(d, "b", batches=5)
            try:
                assert b.wait_for("OWNER") == "OWNER 2"
                b.wait_for("DONE")
            finally:
                b.stop()
        else:
            (d / EPOCH_FILE).write_text(json.dumps({"epoch": 2, "pid": 0, "host": "elsewhere"}))
        before = disk(d)
        for what in ("append", "mark", "compact", "state"):
            answer = a.command(what)
            assert answer.startswith("FENCED") and "epoch 1" in answer and "no longer owns" in answer, answer
        assert disk(d) == before
    finally:
        a.stop()
    state = read_state(d)
    assert state is not None and state.version == 999 and state.epoch == 1  # A's write before it lost it
    log = FeedbackLog(d) if how == "lock file removed" else None
    if log is not None:  # the log A and B wrote reopens, A's late event absent
        try:
            assert len(log) == 120 + 20 and not [e for e in log.read_from(0) if e.event_id == "a-late"]
        finally:
            log.close()


def test_ownership_epochs_only_go_up_and_the_state_file_needs_the_lease(tmp_path):
    """In one process, two Ownership objects are two open files: flock makes them exclude each
    other as it does two processes. The epoch is durable and only goes up; a state file write
    by a non-owner is refused and leaves the file as it was."""
    first, second = Ownership(tmp_path), Ownership(tmp_path)
    assert first.try_acquire() and first.epoch == 1
    assert not second.try_acquire() and second.epoch is None
    with pytest.raises(NotOwner, match="does not own"):
        StateFile(second).write(LearnerState(version=5))
    StateFile(first).write(LearnerState(version=3, epoch=first.epoch))
    first.release()
    assert second.try_acquire() and second.epoch == 2 and read_epoch(tmp_path) == 2
    with pytest.raises(NotOwner):  # released: the first is no owner any more
        StateFile(first).write(LearnerState(version=7))
    assert read_state(tmp_path).version == 3
    second.release()
    third = Ownership(tmp_path)
    assert third.try_acquire() and third.epoch == 3
    third.release()


def test_a_damaged_epoch_file_stops_ownership_with_instructions_and_keeps_no_lease(tmp_path):
    """Nobody can tell which epoch came last from a damaged epoch file: taking ownership is
    refused with what to do, and the failed attempt leaves the lock free."""
    from online_learning.persistence import DamagedEpoch

    (tmp_path / EPOCH_FILE).write_text("")
    with pytest.raises(DamagedEpoch, match="write .*epoch.* above"):
        Ownership(tmp_path).try_acquire()
    (tmp_path / EPOCH_FILE).write_text(json.dumps({"epoch": 7}))
    fixed = Ownership(tmp_path)
    assert fixed.try_acquire() and fixed.epoch == 8  # the lock was not kept by the failed attempt
    fixed.release()


def test_a_second_taker_of_the_same_epoch_number_fences_the_first(tmp_path):
    """Where locks do not work, two learners can both read epoch N and write N + 1: the one whose
    token is not on disk is no longer the owner, although the number is its own."""
    import json

    from online_learning.persistence import EPOCH_FILE, NotOwner, Ownership

    first = Ownership(tmp_path)
    assert first.try_acquire() and first.epoch == 1
    first.check()  # owns it
    path = tmp_path / EPOCH_FILE
    holder = json.loads(path.read_text())
    path.write_text(json.dumps({**holder, "pid": holder["pid"] + 1, "token": "another-taker"}))  # same epoch 1
    with pytest.raises(NotOwner, match="passed to epoch 1"):
        first.check()
    first.release()


def test_a_damaged_epoch_file_mid_run_is_a_lost_ownership_not_a_crash(tmp_path):
    from online_learning.persistence import EPOCH_FILE, NotOwner, Ownership

    owner = Ownership(tmp_path)
    assert owner.try_acquire()
    (tmp_path / EPOCH_FILE).write_text("{not json")
    with pytest.raises(NotOwner, match="unreadable"):
        owner.check()
    owner.release()
