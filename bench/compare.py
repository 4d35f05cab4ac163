"""python -m bench compare: the 2017 table, for this system and the architectures it replaces.

Each system is started in turn on the same model-store version and gets the same steps:
closed loop over a ramp of concurrent users (the 2017 study's 1, 11, ..., 91 and 300, 310, ...,
400 by default), each step `--repeat` times (median and min-max reported), optionally open-loop
fixed rates. The client's own ceiling is measured first against a no-op server. Writes OUT.json,
OUT.md and OUT.png. The `-cnn` system serves the newest version of `--cnn-store` instead (a CNN
model, `python -m train --arch cnn`), so both model families are measured in one run.

`--tree NAME=PATH` names another checkout of this project (a git worktree of another revision);
then `SYSTEM@NAME` is a Serve system run from that tree's own code, shipped config and
`python -m serve run` (bench.systems.RunningTreeServe), measured by this bench in the same run as
the others, so revisions are compared with the same client, steps and rounds. The report then
gives each later tree's ratios to each earlier one, per round too with `--interleave`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.ab import ab_binary, ab_step
from bench.compare_report import _line, markdown, plot, summary_lines
from bench.cpu_cost import CpuMeter
from bench.load import bench_texts, closed_loop, open_loop
from bench.stats import combine_runs, goodput
from bench.systems import (ServeVariant, SourceTree, split_system, start_baseline, start_noop, start_variant,
                           variant_changes)

DEFAULT_USERS = [*range(1, 92, 10), *range(300, 401, 10)]
SYSTEMS = {
    "flask-2017": "Flask, threaded, model.predict per request (the 2017 architecture)",
    "tuned-single": "one process: aiohttp + micro-batcher + compiled model, no Ray",
    "textserve-batched-1": "this system: Ray Serve, fast ingress, batched, 1 replica",
    "textserve-batched-1-cnn": "this system, batched, 1 replica, serving the CNN family's model (--cnn-store)",
    "textserve-unbatched-1": "this system, max_batch_size 1, 1 replica",
    "textserve-batched-2": "this system, batched, 2 replicas",
    "textserve-noop-1": "Serve's floor: a plain `async def __call__` answering a fixed body, 1 replica, same ingress",
    "textserve-noop-2": "Serve's floor with 2 replicas (the shipped replica count), same ingress",
    "textserve-default": "this system as shipped: cluster/serve_local.yaml (learner on, autoscaling as shipped)",
    "textserve-default-nohametrics": "as shipped, with Ray's per-request HAProxy metrics off "
                                     "(RAY_SERVE_HAPROXY_METRICS_ENABLED=0): what that reader costs",
}
VARIANTS = {
    "textserve-batched-1": ServeVariant("textserve-batched-1"),
    "textserve-batched-1-cnn": ServeVariant("textserve-batched-1-cnn"),
    "textserve-unbatched-1": ServeVariant("textserve-unbatched-1", max_batch_size=1),
    "textserve-batched-2": ServeVariant("textserve-batched-2", replicas=2),
    "textserve-noop-1": ServeVariant("textserve-noop-1", kind="noop"),
    "textserve-noop-2": ServeVariant("textserve-noop-2", kind="noop", replicas=2),
    "textserve-default": ServeVariant("textserve-default", kind="shipped"),
    "textserve-default-nohametrics": ServeVariant("textserve-default-nohametrics", kind="shipped",
                                                  env=(("RAY_SERVE_HAPROXY_METRICS_ENABLED", "0"),)),
}

NEEDS_CNN_STORE = {"textserve-batched-1-cnn"}
ON_REQUEST = {"textserve-noop-2", "textserve-default-nohametrics"}  # not in the default set: named in --systems when wanted


def start_system(name: str, store: str, trees: dict[str, SourceTree] | None = None):
    base, tree = split_system(name)
    if tree is not None:
        return start_variant(VARIANTS[base], store, tree=trees[tree])
    return start_variant(VARIANTS[name], store) if name in VARIANTS else start_baseline(name, store)


def describe_system(name: str, trees: dict[str, SourceTree] | None = None) -> str:
    base, tree = split_system(name)
    if tree is None:
        return SYSTEMS[name]
    info = trees[tree].describe()
    commit = (info["commit"] or "?")[:10] + (", with uncommitted changes" if info["modified"] else "")
    return f"{SYSTEMS[base]}; run from the source tree {tree} ({info['path']}, commit {commit}: {info['subject']})"


def ingress_environment() -> dict[str, str]:
    """The hardened ingress's settings this process's environment sets (every system started by
    this bench inherits them, as a user's shell would pass them on); the ingress secret left out."""
    from serve.haproxy_hardening import DEFAULTS

    return {k: os.environ[k] for k in sorted(DEFAULTS) if k in os.environ}


def model_line(store: str) -> str:
    """What a store's newest version is: family, size, parameters (from its metrics and config)."""
    from train.store import ModelStore

    loaded = ModelStore(store).load()
    return f"{loaded.arch} {loaded.size_name} model, {loaded.model.count_params():,} parameters"


def cores() -> dict:
    """The cores this process may run on and the machine's counts, measured."""
    import psutil

    return {"usable": len(os.sched_getaffinity(0)), "logical": psutil.cpu_count(logical=True),
            "physical": psutil.cpu_count(logical=False)}


def run(systems: list[str], users: list[int], rates: list[float], duration_s: float, store: str,
        keepalive: bool, repeat: int = 1, cnn_store: str | None = None, interleave: bool = False,
        ab: bool = False, trees: dict[str, SourceTree] | None = None) -> dict:
    """Every system's steps, `repeat` times each: back to back per step, or with `interleave` in
    rounds over all systems (each system started afresh per round), so that a slow drift of a
    shared machine falls on every system alike and each round gives paired ratios."""
    texts = bench_texts()
    report = {"systems": {}, "users": users, "rates": rates, "duration_s": duration_s, "keepalive": keepalive,
              "repeat": repeat, "interleaved": interleave, "client": "bench.load aiohttp closed loop, " + (
                  "keep-alive" if keepalive else "a new TCP connection per request (force_close)")}
    with start_noop() as noop:
        ceiling = asyncio.run(closed_loop(f"{noop.url}/v1/predict", max(users), duration_s, texts, keepalive))
    report["client_ceiling"] = ceiling.summary()
    tqdm.write(f"client ceiling (no-op server, {max(users)} users): {ceiling.summary()['tps']:.0f} req/s")
    rounds, per_round = (repeat, 1) if interleave else (1, repeat)
    runs = {name: {n: [] for n in users} for name in systems}
    ab_runs = {name: {n: [] for n in users} for name in systems}  # Apache Bench, right after each aiohttp step
    open_rows: dict[str, list] = {name: [] for name in systems}
    report["schedule"] = []  # (round, system, start time): the order the systems were measured in
    for r in range(rounds):
        for name in systems:
            report["schedule"].append({"round": r + 1, "system": name, "started": time.time()})
            with start_system(name, cnn_store if name in NEEDS_CNN_STORE else store, trees) as system:
                url = f"{system.url}/v1/predict"
                asyncio.run(closed_loop(url, 8, 3, texts, keepalive))  # warm up: traces, caches
                label = name + (f", round {r + 1} of {rounds}" if rounds > 1 else "")
                meter = CpuMeter(system.proc.pid)
                for n in tqdm(users, desc=label, unit="step", leave=False):
                    runs[name][n] += [_measured_step(meter, url, n, duration_s, texts, keepalive)
                                      for _ in range(per_round)]
                    if ab:
                        ab_runs[name][n] += [_measured_step(meter, url, n, duration_s, texts, keepalive, ab=True)
                                             for _ in range(per_round)]
                    if r == rounds - 1:
                        tqdm.write(_line(name, combine_runs(runs[name][n])))
                        if ab:
                            tqdm.write(_line(f"{name} (ab)", combine_runs(ab_runs[name][n])))
                if r == rounds - 1:
                    for rate in rates:
                        open_rows[name].append(asyncio.run(open_loop(url, rate, duration_s, texts)).summary())
                        tqdm.write(f"{name:>22} open loop {rate:7.0f}/s: p99 {open_rows[name][-1]['p99_ms']:8.1f} ms, "
                                   f"failed {open_rows[name][-1]['failed']}, late {open_rows[name][-1]['late']}")
    for name in systems:
        rows = [combine_runs(runs[name][n]) for n in users]
        base, tree = split_system(name)
        changes = variant_changes(VARIANTS[base], trees[tree] if tree else None) if base in VARIANTS else None
        report["systems"][name] = {"description": describe_system(name, trees), "closed_loop": rows,
                                   "open_loop": open_rows[name],
                                   "goodput": goodput(rows), "changes_from_shipped": changes}
        if ab:
            report["systems"][name]["ab_closed_loop"] = [combine_runs(ab_runs[name][n]) for n in users]
    report["clients"] = ["aiohttp"] + (["ab"] if ab else [])
    if trees:
        report["trees"] = {name: tree.describe() for name, tree in trees.items()}
    return report


def _measured_step(meter: CpuMeter, url: str, users: int, duration_s: float, texts: list[str], keepalive: bool,
                   ab: bool = False) -> dict:
    """One closed-loop step (the aiohttp client, or Apache Bench on one text as in 2017), with the
    server's CPU per answer over it (bench.cpu_cost). The client's own CPU is left out either way:
    aiohttp runs in this process, ab in a child that is not among the server's processes."""
    meter.start()
    if ab:
        summary = ab_step(url, users, duration_s, texts[0], keepalive)
    else:
        summary = asyncio.run(closed_loop(url, users, duration_s, texts, keepalive)).summary()
    return {**summary, **meter.stop(summary["complete"])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: systems, users and rates come back as lists."""
    p = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="model store; its newest version is served by every system")
    p.add_argument("--cnn-store", help="model store whose newest version (a CNN) textserve-batched-1-cnn serves")
    p.add_argument("--systems", help=f"comma-separated, from {','.join(SYSTEMS)} (default: all but textserve-noop-2; "
                                     "the -cnn one with --cnn-store)")
    p.add_argument("--users", default=",".join(map(str, DEFAULT_USERS)), help="closed-loop steps (default: as in 2017)")
    p.add_argument("--rates", default="", help="open-loop arrival rates, req/s (default: none)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per step (default 10)")
    p.add_argument("--no-keepalive", action="store_true", help="a new connection per request, like ab without -k")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each step; median and min-max (default 3)")
    p.add_argument("--interleave", action="store_true",
                   help="run the repetitions in rounds over all systems, each started afresh per round, instead of "
                        "back to back: a shared machine's slow drifts then fall on every system alike, and ratios "
                        "are also given per round")
    p.add_argument("--ab", action="store_true",
                   help="after each aiohttp step, the same step with Apache Bench (the 2017 study's client; one text, "
                        "ab -l); needs apache2-utils")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="another checkout of this project (e.g. a git worktree of another revision); "
                        "--systems may then name SYSTEM@NAME, a Serve system run from that tree's own code, "
                        "shipped config and python -m serve run; repeatable")
    p.add_argument("--out", default="docs/BENCHMARKS", help="report path without extension")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    default = [s for s in SYSTEMS if (a.cnn_store or s not in NEEDS_CNN_STORE) and s not in ON_REQUEST]
    systems = [s for s in a.systems.split(",") if s] if a.systems else default
    try:
        a.trees = {t.name: t for t in map(SourceTree.parse, a.tree)}
    except ValueError as e:
        p.error(f"--tree {e}")
    if len(a.trees) != len(a.tree):
        p.error("--tree: each NAME once")
    for name in systems:
        base, tree = split_system(name)
        if tree is not None and tree not in a.trees:
            p.error(f"{name}: no --tree {tree}=PATH given")
        if tree is not None and (base not in VARIANTS or base in NEEDS_CNN_STORE):
            p.error(f"{name}: only this system's Serve variants run from a source tree, "
                    f"from {[v for v in VARIANTS if v not in NEEDS_CNN_STORE]}")
    if unknown := {s for s in systems if split_system(s)[0] not in SYSTEMS}:
        p.error(f"unknown system(s) {sorted(unknown)}; choose from {list(SYSTEMS)}")
    if len(set(systems)) != len(systems):
        p.error("--systems names a system twice")
    if not a.cnn_store and (cnn := sorted(set(systems) & NEEDS_CNN_STORE)):
        p.error(f"{', '.join(cnn)} serves a CNN model: give --cnn-store (a store trained with --arch cnn)")
    users = [int(u) for u in a.users.split(",") if u]
    a.rates = [float(r) for r in a.rates.split(",") if r]
    a.systems, a.users = systems, users
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    systems, users, rates = a.systems, a.users, a.rates
    from train.store import ModelStore

    loaded_metrics = ModelStore(a.store).load().metrics
    models = {"store": model_line(a.store)}
    if a.cnn_store:
        models["cnn_store"] = model_line(a.cnn_store)
        if not models["cnn_store"].startswith("cnn "):
            print(f"error: --cnn-store {a.cnn_store} serves a {models['cnn_store']}, not a CNN", file=sys.stderr)
            return 2
    if a.ab:
        ab_binary()  # missing: say so now, not after the first system's steps
    report = run(systems, users, rates, a.duration, a.store, not a.no_keepalive, a.repeat, a.cnn_store, a.interleave,
                 a.ab, a.trees)
    report["environment"] = ingress_environment()
    report.update(command="python -m bench compare " + " ".join(argv if argv is not None else sys.argv[2:]),
                  cores=cores(), machine=f"{platform.machine()}, {cores()['usable']} usable cores ({cores()['logical']} "
                  f"logical, {cores()['physical']} physical, measured), client and servers on the same machine",
                  date=time.strftime("%Y-%m-%d"),
                  model=f"{loaded_metrics.get('size', '?')} model, {loaded_metrics.get('parameters', 0):,} parameters",
                  models=models)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(report, indent=2))
    Path(a.out + ".md").write_text(markdown(report, Path(a.out).name + ".png"))
    plot(report, a.out + ".png")
    print("\n".join(summary_lines(report)))
    print(f"\nwrote {a.out}.md, {a.out}.json, {a.out}.png")
    return 0
