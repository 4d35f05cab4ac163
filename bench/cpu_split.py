"""python -m bench cpu_split --store STORE [--system NAME]: where the machine's CPU goes under load.

Starts one Serve system of `python -m bench compare` (default: textserve-default, the shipped
config), warms it, then drives `--users` closed-loop users with a new connection per request
for `--duration` seconds and samples every process's CPU (psutil) over the middle of that
window: the load client (this process), HAProxy, each Ray actor, the learner. One line per
process group, busiest first, in percent of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    import psutil

    from bench.compare import VARIANTS, bench_texts, start_system
    from bench.load import closed_loop

    p = argparse.ArgumentParser(prog="python -m bench cpu_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="model store; its newest version is served")
    p.add_argument("--system", choices=sorted(VARIANTS), default="textserve-default")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load; CPU is sampled over all but 2")
    a = p.parse_args(argv)
    with start_system(a.system, a.store) as system:
        url, texts, result = f"{system.url}/v1/predict", bench_texts(), {}
        asyncio.run(closed_loop(url, 64, 3, texts, keepalive=False))  # warm-up
        load = threading.Thread(target=lambda: result.update(
            step=asyncio.run(closed_loop(url, a.users, a.duration, texts, keepalive=False))))
        procs = list(psutil.process_iter(["cmdline", "name"]))
        for proc in procs:
            try:
                proc.cpu_percent(None)
            except psutil.Error:
                pass
        load.start()
        time.sleep(max(1.0, a.duration - 2))
        usage: collections.Counter = collections.Counter()
        for proc in procs:
            try:
                usage[(" ".join(proc.info["cmdline"] or [proc.info["name"]]))[:70]] += proc.cpu_percent(None)
            except psutil.Error:
                pass
        load.join()
    print(f"{a.system}, {a.users} users, a new connection per request: {result['step'].summary()['tps']:.0f} req/s")
    for name, cpu in usage.most_common():
        if cpu >= 1:
            print(f"{cpu:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
