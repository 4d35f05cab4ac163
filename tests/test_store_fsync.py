"""A local model store makes a version durable before committing it: every file and folder of the
version is fsynced before `_COMMITTED` is renamed into place, and the marker and its rename are
fsynced before publish returns. Observed with strace on a real publish in a child process (the
system calls themselves: nothing in the store is replaced)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CALL = re.compile(r'^(\d+)\s+(openat|fsync|rename|renameat|renameat2)\((.*)\)\s+=\s+(-?\d+)')


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_file_and_folder_is_fsynced_before_the_marker(tmp_path):
    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    (src / "metrics.json").write_text('{"kind": "test"}')
    (src / "weights.bin").write_bytes(os.urandom(100_000))
    (src / "variables" / "data.bin").write_bytes(os.urandom(50_000))
    store = tmp_path / "store"
    trace = tmp_path / "trace.txt"
    code = "import sys; from train.store import ModelStore; print(ModelStore(sys.argv[1]).publish(sys.argv[2]))"
    done = subprocess.run(["strace", "-f", "-o", str(trace), "-e", "trace=openat,fsync,rename,renameat,renameat2",
                           sys.executable, "-c", code, str(store), str(src)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-3000:]
    version = store / "v000001"
    fds: dict[int, str] = {}  # fd -> path it was last opened for (threads of one process share fds)
    synced: list[str] = []
    marker_at = None
    for line in trace.read_text().splitlines():
        m = CALL.match(line)
        if not m:
            continue
        pid, call, args, ret = m.group(1), m.group(2), m.group(3), int(m.group(4))
        if call == "openat" and ret >= 0:
            fds[ret] = re.search(r'"([^"]*)"', args).group(1)
        elif call == "fsync" and ret == 0:
            synced.append(fds.get(int(args.split(",")[0]), "?"))
        elif call.startswith("rename") and "_COMMITTED" in args and ret == 0:
            marker_at = len(synced)
    assert marker_at is not None, "no rename of _COMMITTED seen"
    before = {os.path.normpath(p) for p in synced[:marker_at]}
    for path in ("metrics.json", "weights.bin", "variables/data.bin", "variables", ""):
        assert os.path.normpath(str(version / path)) in before, (path, synced)
    assert os.path.normpath(str(store)) in before
    assert os.path.normpath(str(version)) in {os.path.normpath(p) for p in synced[marker_at:]}  # the rename
