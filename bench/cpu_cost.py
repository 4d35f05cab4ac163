"""Work per request: the CPU a system's server processes spend per 1,000 answered requests.

On a 2-core machine the load client shares the cores with the server, so throughput ratios are
capped by the client; CPU per answer is what the machine can compare honestly. Two readings per
load step, both from the OS:
- `server`: user + system CPU of the system's own processes: the process the bench started, its
  descendants, and every process still in its session (Ray's daemons, workers, HAProxy), the
  client excluded. A process that ends inside the step is missed (none does in a steady step).
- `machine_minus_client`: the machine's busy CPU (all cores, from /proc/stat) minus the client's
  own (this process, and the Apache Bench child it waited for): kernel networking and anything else running counts, so it is an upper bound
  on the system's cost and equals `server` plus the rest of the machine's activity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


def _cpu(proc: psutil.Process, children: bool = False) -> float:
    """User + system CPU seconds; with `children`, also of its children that ended and were waited
    for (an Apache Bench run)."""
    times = proc.cpu_times()
    return times.user + times.system + ((times.children_user + times.children_system) if children else 0.0)


def server_processes(root_pid: int) -> list[psutil.Process]:
    """`root_pid`, its descendants, and the processes of its session (it leads one: the bench
    starts systems with start_new_session), which includes daemons that left the tree."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        for proc in [root, *root.children(recursive=True)]:
            found[proc.pid] = proc
    except psutil.NoSuchProcess:
        return []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and os.getsid(proc.pid) == root_pid:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(found.values())


def _tree_cpu(root_pid: int) -> dict[tuple[int, float], float]:
    """CPU seconds of each server process, keyed by (pid, start time) so a reused PID is a new one."""
    out = {}
    for proc in server_processes(root_pid):
        try:
            out[(proc.pid, proc.create_time())] = _cpu(proc)
        except psutil.Error:
            continue
    return out


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class CpuReading:
    server: dict[tuple[int, float], float]
    machine: float
    client: float


class CpuMeter:
    """`start()` before a load step and `stop(answered)` after it: the step's CPU cost."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self._me = psutil.Process()
        self._start: CpuReading | None = None

    def _read(self) -> CpuReading:
        return CpuReading(_tree_cpu(self.root_pid), _machine_busy(), _cpu(self._me, children=True))

    def start(self) -> None:
        self._start = self._read()

    def stop(self, answered: int) -> dict:
        end, start = self._read(), self._start
        server = sum(cpu - start.server.get(key, 0.0) for key, cpu in end.server.items())
        client = end.client - start.client
        machine_minus_client = end.machine - start.machine - client
        per_1k = (lambda s: s * 1000.0 / answered) if answered else (lambda s: float("nan"))
        return {"server_cpu_s": round(server, 3), "client_cpu_s": round(client, 3),
                "machine_minus_client_cpu_s": round(machine_minus_client, 3),
                "server_processes": len(end.server),
                "cpu_s_per_1k": per_1k(server), "machine_cpu_s_per_1k": per_1k(machine_minus_client)}
