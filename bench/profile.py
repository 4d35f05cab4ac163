"""python -m bench profile: where a request's time goes in a Serve replica, under load.

Starts one system of `python -m bench compare` (default: this system, 1 replica), drives it with
the closed-loop client, and records the replica process with py-spy (`pip install -e .[dev]`) for
`--duration` seconds. Writes OUT.speedscope.json (open it at https://www.speedscope.app) or
OUT.svg (`--format flamegraph`), and OUT.txt: the load's figures and the top frames by share of
samples (inclusive and self). py-spy samples without stopping the process (--nonblocking) and
counts only threads that are running, so the shares are of the replica's busy time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPLICA_TITLE = "ServeReplica:"


def replica_pids(root_pid: int, deployment: str) -> list[int]:
    """PIDs of the Serve replicas of `deployment` started under `root_pid` (the `serve run` process)."""
    import psutil

    pids = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if REPLICA_TITLE in title and f":{deployment}" in title:
            pids.append(proc.pid)
    return sorted(pids)


def wait_for_replica(root_pid: int, deployment: str, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pids := replica_pids(root_pid, deployment):
            return pids[0]
        time.sleep(0.5)
    raise RuntimeError(f"no {REPLICA_TITLE}...{deployment} process under pid {root_pid}")


def thread_seconds(speedscope: dict) -> list[tuple[str, float]]:
    """Busy seconds sampled per thread (py-spy's speedscope weights are seconds)."""
    return sorted(((p["name"], sum(p["weights"])) for p in speedscope["profiles"]), key=lambda t: -t[1])


def top_frames(speedscope: dict, limit: int = 25) -> tuple[list[tuple[str, float]], list[tuple[str, float]], float]:
    """(inclusive, self, total): each frame's share of all samples, from py-spy's speedscope file."""
    frames = speedscope["shared"]["frames"]
    names = [f"{f['name']} ({Path(f.get('file') or '?').name}:{f.get('line', '?')})" for f in frames]
    inclusive, own, total = Counter(), Counter(), 0
    for prof in speedscope["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"]):
            total += weight
            for idx in set(stack):
                inclusive[names[idx]] += weight
            if stack:
                own[names[stack[-1]]] += weight
    share = lambda c: [(name, n / total) for name, n in c.most_common(limit)] if total else []  # noqa: E731
    return share(inclusive), share(own), total


def report_text(load: dict, inclusive, own, threads, header: str) -> str:
    lines = [header, f"load: {load['tps']:.1f} req/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, "
             f"failed {load['failed']}", "busy seconds sampled per thread:"]
    lines += [f"  {seconds:6.2f} s  {name}" for name, seconds in threads]
    lines += ["", "top frames, inclusive (share of all busy samples):"]
    lines += [f"  {share * 100:5.1f}%  {name}" for name, share in inclusive]
    lines += ["", "top frames, self:"] + [f"  {share * 100:5.1f}%  {name}" for name, share in own]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.compare import SYSTEMS, VARIANTS
    from bench.systems import SourceTree, split_system

    serve_systems = [name for name in SYSTEMS if name in VARIANTS]
    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="model store; its newest version is served")
    p.add_argument("--system", default="textserve-batched-1",
                   help=f"which Serve system, from {','.join(serve_systems)}; SYSTEM@NAME with --tree NAME=PATH")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="another checkout of this project whose system SYSTEM@NAME runs (as in bench compare)")
    p.add_argument("--users", type=int, default=400, help="closed-loop users during the recording (default 400)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds recorded (default 15)")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--no-keepalive", action="store_true", help="a new connection per request, like ab without -k")
    p.add_argument("--format", choices=("speedscope", "flamegraph"), default="speedscope")
    p.add_argument("--out", default="artifacts/profile/replica", help="output path without extension")
    a = p.parse_args(argv)
    try:
        trees = {t.name: t for t in map(SourceTree.parse, a.tree)}
    except ValueError as e:
        p.error(f"--tree {e}")
    base, tree = split_system(a.system)
    if base not in serve_systems or (tree is not None and tree not in trees):
        p.error(f"--system {a.system}: choose from {serve_systems}, with @NAME only for a --tree NAME=PATH given")
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        p.error("py-spy is not installed: pip install -e '.[dev]'")

    from bench.compare import start_system
    from bench.load import bench_texts, closed_loop

    texts, keepalive = bench_texts(), not a.no_keepalive
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded = Path(f"{out}.speedscope.json" if a.format == "speedscope" else f"{out}.svg")
    with start_system(a.system, a.store, trees) as system:
        url = f"{system.url}/v1/predict"
        asyncio.run(closed_loop(url, 8, 3, texts, keepalive))  # warm up
        deployment = "NoopServe" if VARIANTS[base].kind == "noop" else "Classifier"
        pid = wait_for_replica(system.proc.pid, deployment)
        # The load starts first and outlasts the recording by a second on each side.
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(a.duration)), "--rate", str(a.rate),
             "--nonblocking", "--format", a.format, "--output", str(recorded)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        load = asyncio.run(closed_loop(url, a.users, a.duration + 2, texts, keepalive)).summary()
        spy_log, _ = recorder.communicate(timeout=60)
    if recorder.returncode != 0:
        print(spy_log, file=sys.stderr)
        return 1
    header = (f"python -m bench profile {' '.join(argv if argv is not None else sys.argv[2:])}\n"
              f"system {a.system}, replica pid {pid}, {a.users} users, "
              f"{'keep-alive' if keepalive else 'a new connection per request'}, {a.duration:.0f} s at {a.rate} Hz")
    if a.format == "speedscope":
        profile = json.loads(recorded.read_text())
        (inclusive, own, _), threads = top_frames(profile), thread_seconds(profile)
    else:
        inclusive, own, threads = [], [], []
    text = report_text(load, inclusive, own, threads, header)
    Path(f"{out}.txt").write_text(text)
    print(text + f"\nwrote {recorded} and {out}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
