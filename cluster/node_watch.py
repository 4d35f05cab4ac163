"""End what a worker's `ray start` leaves running once that node's raylet is gone.

`ray down` with the `local` provider (cluster/onprem.yaml) runs `ray stop` on the head only and
marks the workers terminated. A worker's raylet exits by itself once the head's GCS has been
unreachable for 60 s, and its workers with it, but Ray's log monitor (log_monitor.py, started by
`ray start` beside the raylet) loops forever, and the dashboard and runtime-env agents can outlive
it. cluster/onprem.yaml runs this file right after `ray start` on every worker: it finds the raylet
that start began, detaches, and while that raylet lives keeps a list of the processes that belong to
it (its descendants, and every process whose command line names its session folder). Once the
raylet is gone it stops them: SIGTERM, SIGKILL after a grace period, each by PID and start time,
so nothing that a later `ray start` began is touched. Then it exits.

Linux only (/proc). Standard library only. Its log: SESSION/logs/textserve_node_watch.log.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a PID's reuse apart), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _processes() -> dict[int, tuple[int, int, bytes, bytes]]:
    """pid -> (start time, parent pid, comm, command line) of this user's processes."""
    uid = os.getuid()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                head, tail = f.read().rsplit(b")", 1)
            fields = tail.split()
            comm = head.split(b"(", 1)[1]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
            found[pid] = (int(fields[19]), int(fields[1]), comm, cmdline)
        except (OSError, IndexError, ValueError):
            continue
    return found


def find_raylet() -> tuple[int, int, str] | None:
    """(pid, start time, session folder) of this user's newest raylet: the one `ray start` began."""
    newest = None
    for pid, (start, _, comm, cmdline) in _processes().items():
        match = re.search(rb"--session_dir=(\S+)", cmdline)
        if comm == b"raylet" and match and (newest is None or start > newest[1]):
            newest = (pid, start, match.group(1).decode())
    return newest


def belonging(raylet: int, session_dir: str, procs: dict) -> dict[int, int]:
    """pid -> start time of the raylet's descendants and of the processes naming its session."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [raylet]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in mine:
                mine.add(child)
                todo.append(child)
    marker = session_dir.encode()
    mine |= {pid for pid, (_, _, _, cmdline) in procs.items() if marker in cmdline}
    mine.discard(os.getpid())
    mine.discard(raylet)
    return {pid: procs[pid][0] for pid in mine}


def stop(tracked: dict[int, int], grace_s: float) -> list[int]:
    """SIGTERM the tracked processes still running (same PID and start time), SIGKILL what is left
    after grace_s. Returns the PIDs signalled."""
    def alive():
        return [pid for pid, start in tracked.items() if _start_time(pid) == start]

    signalled = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in alive():
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return sorted(set(signalled))


def watch(raylet: int, raylet_start: int, session_dir: str, interval_s: float, grace_s: float) -> None:
    tracked: dict[int, int] = {}
    while True:
        seen = belonging(raylet, session_dir, _processes())
        # the scan counts only if the raylet outlived it: a process started after the raylet died
        # (a new `ray start`) is never tracked
        if _start_time(raylet) != raylet_start:
            break
        tracked.update(seen)
        time.sleep(interval_s)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} raylet {raylet} is gone; stopping {sorted(tracked)}", flush=True)
    signalled = stop(tracked, grace_s)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} signalled {signalled}; done", flush=True)


def _detach(log_path: str) -> None:
    """Leave the caller (an SSH session of `ray up`) at once: fork twice, new session, no terminal."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    os.chdir("/")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-s", type=float, default=2.0)
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + 30
    while (found := find_raylet()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if found is None:
        print("node_watch: no raylet of this user is running (run it right after `ray start`)", file=sys.stderr)
        return 1
    raylet, raylet_start, session_dir = found
    print(f"node_watch: watching raylet {raylet} ({session_dir})")
    sys.stdout.flush()
    if not args.foreground:
        _detach(os.path.join(session_dir, "logs", "textserve_node_watch.log"))
    watch(raylet, raylet_start, session_dir, args.interval_s, args.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
