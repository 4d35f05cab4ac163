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


def process_label(proc) -> str:
    """A process's command line, cut to 70 characters: Ray actors read as `ray::Actor.method`."""
    return (" ".join(proc.info["cmdline"] or [proc.info["name"]]))[:70].strip()


class CpuSampler:
    """Every process's CPU between `start()` and `stop()`, in percent of one core, grouped by
    command line (psutil; processes that start in between are not counted)."""

    def __init__(self):
        self._procs: list = []

    def start(self) -> None:
        import psutil

        self._procs = list(psutil.process_iter(["cmdline", "name"]))
        for proc in self._procs:
            try:
                proc.cpu_percent(None)
            except psutil.Error:
                pass

    def stop(self) -> collections.Counter:
        import psutil

        usage: collections.Counter = collections.Counter()
        for proc in self._procs:
            try:
                usage[process_label(proc)] += proc.cpu_percent(None)
            except psutil.Error:
                pass
        return usage

    def window(self, after_s: float, length_s: float) -> tuple[threading.Thread, collections.Counter]:
        """Sample from `after_s` to `after_s + length_s` from now, in a thread; the counter fills
        when the thread ends (join it)."""
        usage: collections.Counter = collections.Counter()

        def sample() -> None:
            time.sleep(after_s)
            self.start()
            time.sleep(length_s)
            usage.update(self.stop())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        return thread, usage


def main(argv: list[str] | None = None) -> int:
    from bench.compare import VARIANTS, bench_texts, start_system
    from bench.load import closed_loop

    p = argparse.ArgumentParser(prog="python -m bench cpu_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="model store; its newest version is served")
    p.add_argument("--system", choices=sorted(VARIANTS), default="textserve-default")
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load; CPU is sampled over all but the first and the last")
    a = p.parse_args(argv)
    with start_system(a.system, a.store) as system:
        url, texts, result = f"{system.url}/v1/predict", bench_texts(), {}
        asyncio.run(closed_loop(url, 64, 3, texts, keepalive=False))  # warm-up
        sampler, usage = CpuSampler().window(1.0, max(1.0, a.duration - 2))
        result["step"] = asyncio.run(closed_loop(url, a.users, a.duration, texts, keepalive=False))
        sampler.join()
    print(f"{a.system}, {a.users} users, a new connection per request: {result['step'].summary()['tps']:.0f} req/s")
    for name, cpu in usage.most_common():
        if cpu >= 1:
            print(f"{cpu:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
