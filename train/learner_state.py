"""The online learner's state file, `learner_state.json` in its state_dir: its format and reader.

The learner (online_learning.persistence) writes it; a fine-tune (train/job.py) reads how far the
learner has judged the log. Both import this module, which imports neither.

Fields: `version` (the highest number the learner has used: no later lineage may reuse it),
`holdout_salt`, `lineage`, `log_offset` (applied), `judged_offset` (events up to it were judged
by a round), `epoch` (the ownership epoch of the learner that wrote it),
`base_version` (the store version the lineage started from), `store_seen` and
`store_pending` (the model store's numbers the learner has looked at: every committed version up to
`store_seen` except those in `store_pending`, publishes that were still uploading below it, which
it adopts once they commit, even after a restart).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["STATE_FILE", "LearnerState", "read_state", "judged_offset", "encode_state", "write_state_file"]

STATE_FILE = "learner_state.json"


@dataclass(frozen=True)
class LearnerState:
    version: int = 0
    holdout_salt: str | None = None
    lineage: str | None = None
    log_offset: int = -1
    judged_offset: int = -1
    epoch: int | None = None
    base_version: int | None = None
    store_seen: int | None = None  # None: a state file written before the learner kept it
    store_pending: tuple[int, ...] = ()


def read_state(state_dir: str | Path) -> LearnerState | None:
    """The state file's contents, or None when there is none (a learner never ran there)."""
    path = Path(state_dir) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    # Files written before judged_offset existed: everything applied had been judged.
    judged = raw.get("judged_offset", raw.get("log_offset", -1))
    return LearnerState(version=raw.get("version", 0), holdout_salt=raw.get("holdout_salt"),
                        lineage=raw.get("lineage"), log_offset=raw.get("log_offset", -1), judged_offset=judged,
                        epoch=raw.get("epoch"), base_version=raw.get("base_version"),
                        store_seen=raw.get("store_seen"),
                        store_pending=tuple(raw.get("store_pending", ())))


def judged_offset(state_dir: str | Path) -> int | None:
    """The offset the online learner has judged the log through, or None without a state file.
    A fine-tune reads no further: an event the learner has not judged yet could be one its
    feedback check would refuse; it is judged after the learner adopts the fine-tune instead
    (docs/ONLINE_LEARNING.md)."""
    state = read_state(state_dir)
    return None if state is None else state.judged_offset


def encode_state(state: LearnerState) -> bytes:
    return json.dumps(asdict(state)).encode()


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content, never a mix:
    a temp file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # writers never share one
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_state_file(state_dir: str | Path, state: LearnerState) -> None:
    """Durably replace the state file. The caller checks ownership first: only the owner of
    state_dir may call this."""
    write_durably(Path(state_dir) / STATE_FILE, encode_state(state))
