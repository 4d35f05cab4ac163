"""What makes one learner the only writer of a state_dir: an ownership lease and a fencing epoch;
and the learner's state file, written only while the lease and the epoch hold.

The lease is `flock(LOCK_EX | LOCK_NB)` on `owner.lock`, held for the owning process's life: the
kernel (or the NFSv4 server) releases it when the process dies, however it dies, so a standby
takes over after a crash without anyone cleaning up. Taking ownership increments the durable
epoch in `owner_epoch.json`. Before every write to the state_dir (log appends, marks, compaction,
the state file) and to the model store (reservations, snapshots, retention), the owner checks
that its lock file is still the one the path names and that the durable epoch is still its own:
where a lock is not honoured (a filesystem without working locks, a lock file someone deleted),
a second owner's higher epoch still stops the first from writing. docs/ONLINE_LEARNING.md,
"Ownership", says what this does and does not cover.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from train.learner_state import LearnerState, read_state, write_durably, write_state_file

__all__ = ["LOCK_FILE", "EPOCH_FILE", "DamagedEpoch", "NotOwner", "Ownership", "StateFile", "read_epoch"]

LOCK_FILE = "owner.lock"
EPOCH_FILE = "owner_epoch.json"


class NotOwner(RuntimeError):
    """This process does not own the state_dir (never did, or lost it to a higher epoch): it
    must not write there. `epoch` is the durable epoch of the current owner (0: none yet)."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


class DamagedEpoch(RuntimeError):
    """owner_epoch.json exists but cannot be read: nobody may take ownership until it is fixed."""


def read_epoch(state_dir: str | Path) -> int:
    """The durable ownership epoch of `state_dir` (0 before anyone owned it)."""
    return int(read_holder(state_dir).get("epoch", 0))


def read_holder(state_dir: str | Path) -> dict:
    """Who took the current epoch: {"epoch", "pid", "host", "since", "token"} ({} before anyone)."""
    path = Path(state_dir) / EPOCH_FILE
    try:
        holder = json.loads(path.read_text())
        int(holder["epoch"])
        return holder
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedEpoch(f"{path} is unreadable ({err}); it holds the ownership epoch of {state_dir}. Stop every "
                           f"learner on it, then write {{\"epoch\": N}} there with N above the \"epoch\" in "
                           "learner_state.json") from None


class Ownership:
    """The lease on one state_dir. `try_acquire` takes it (and a new epoch) or says it is held;
    `check` raises NotOwner unless this process still owns it under its epoch."""

    def __init__(self, state_dir: str | Path):
        self.directory = Path(state_dir)
        self.epoch: int | None = None  # this owner's epoch; None while not owning
        self._token: str | None = None  # what this owner wrote with its epoch
        self._fd: int | None = None
        self._lost: str | None = None  # why ownership was lost: sticky, a lost owner never writes again
        self._mutex = threading.Lock()

    @property
    def lock_path(self) -> Path:
        return self.directory / LOCK_FILE

    @property
    def owned(self) -> bool:
        return self._fd is not None and self._lost is None

    def try_acquire(self) -> bool:
        """Take the lease without waiting: True when this process now owns the state_dir (under a
        new, durable epoch), False when another process holds it."""
        with self._mutex:
            if self._fd is not None:
                return self._lost is None
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if not self._names(fd):  # the file was replaced between open and lock: the lock is on a ghost
                os.close(fd)
                return False
            try:
                epoch = read_epoch(self.directory) + 1
                # The token tells two takers of the same number apart (where locks do not work, two
                # may both read N and write N + 1): the one whose token is not on disk has lost.
                holder = {"epoch": epoch, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                          "token": uuid.uuid4().hex}
                write_durably(self.directory / EPOCH_FILE, json.dumps(holder).encode())
                os.ftruncate(fd, 0)  # who holds it, for an operator reading the lock file
                os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            except BaseException:  # the lease is not kept by an owner that could not record its epoch
                os.close(fd)
                raise
            self._fd, self.epoch, self._token, self._lost = fd, epoch, holder["token"], None
            return True

    def acquire(self, stop: threading.Event, retry_s: float = 0.5) -> bool:
        """Wait for the lease (a standby): True once owned, False if `stop` was set first."""
        while not stop.is_set():
            if self.try_acquire():
                return True
            stop.wait(retry_s)
        return False

    def _names(self, fd: int) -> bool:
        """Whether the lock file's path still names the file `fd` holds the lock on."""
        try:
            now, held = os.stat(self.lock_path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def current_epoch(self) -> int:
        return read_epoch(self.directory)

    def check(self) -> None:
        """Raise NotOwner unless this process owns the state_dir under its epoch: called before
        every write. Losing it is final for this Ownership (the process must start again)."""
        with self._mutex:
            if self._fd is None:
                raise NotOwner(f"this process does not own {self.directory} (another learner does)",
                               read_epoch(self.directory))
            if self._lost is None:
                try:
                    holder = read_holder(self.directory)
                except DamagedEpoch as err:
                    holder = {"epoch": -1, "damaged": str(err)}
                if not self._names(self._fd):
                    self._lost = f"its lock file {self.lock_path} was removed or replaced"
                elif "damaged" in holder:
                    self._lost = holder["damaged"]
                elif holder.get("epoch") != self.epoch or holder.get("token", self._token) != self._token:
                    self._lost = f"ownership passed to epoch {holder.get('epoch')} ({holder.get('host')}, pid {holder.get('pid')})"
            if self._lost is not None:
                raise NotOwner(f"this learner (epoch {self.epoch}) no longer owns {self.directory}: {self._lost}; "
                               "it writes nothing more there", self._epoch_or_zero())

    def _epoch_or_zero(self) -> int:
        try:
            return read_epoch(self.directory)
        except DamagedEpoch:
            return 0

    def release(self) -> None:
        """Give the lease up (closing the file releases the lock); the epoch stays as it is."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class StateFile:
    """learner_state.json of a state_dir (format: train/learner_state.py), written only by its owner."""

    def __init__(self, owner: Ownership):
        self.owner = owner

    def read(self) -> LearnerState:
        return read_state(self.owner.directory) or LearnerState()

    def write(self, state: LearnerState) -> None:
        """Durably (fsync, rename, fsync of the folder), after checking ownership: a learner that
        lost the state_dir cannot move the numbers or offsets of the one that owns it now."""
        self.owner.check()
        write_state_file(self.owner.directory, state)
