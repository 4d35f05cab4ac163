"""cluster/node_watch.py: once a raylet is gone, what belonged to it is stopped, nothing else.

A stand-in raylet (a shell script named `raylet`, so its comm is `raylet`) with a child, a process
naming its session folder, and a bystander; no Ray is started.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from cluster import node_watch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")


def _wait(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_stops_the_raylets_descendants_and_its_sessions_processes_only(tmp_path):
    session = tmp_path / "session_test"
    session.mkdir()
    raylet_script = tmp_path / "raylet"
    raylet_script.write_text("#!/bin/sh\nsleep 300 &\nwait\n")
    raylet_script.chmod(0o755)
    raylet = subprocess.Popen([str(raylet_script), f"--session_dir={session}"])
    # like log_monitor.py: not the raylet's child, names the session folder; ignores SIGTERM
    monitor = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 1; done", f"--session-dir={session}"])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        assert _wait(lambda: any(p for p, (_, ppid, _, _) in node_watch._processes().items() if ppid == raylet.pid))
        procs = node_watch._processes()
        assert procs[raylet.pid][2] == b"raylet"
        child = next(p for p, (_, ppid, _, _) in procs.items() if ppid == raylet.pid)
        start = node_watch._start_time(raylet.pid)
        watcher = threading.Thread(target=node_watch.watch, args=(raylet.pid, start, str(session), 0.2, 1.0))
        watcher.start()
        time.sleep(1.0)
        assert watcher.is_alive() and monitor.poll() is None  # nothing stopped while the raylet lives
        raylet.kill()
        raylet.wait()
        watcher.join(timeout=30)
        assert not watcher.is_alive()
        assert monitor.wait(timeout=10) == -9          # SIGTERM ignored: SIGKILL after the grace period
        assert node_watch._start_time(child) is None     # the raylet's child (re-parented by then)
        assert bystander.poll() is None                  # not the raylet's: untouched
    finally:
        for proc in (raylet, monitor, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
