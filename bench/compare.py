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
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.ab import ab_binary, ab_step
from bench.cpu_cost import CpuMeter
from bench.load import bench_texts, closed_loop, open_loop
from bench.stats import combine_runs, goodput
from bench.systems import (ServeVariant, SourceTree, start_baseline, start_noop, start_variant,
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
TABLE = [("users", "users"), ("tps", "TPS"), ("mean_ms", "mean ms"), ("transfer_kb_s", "KB/s"),
         ("complete", "complete"), ("failed", "failed"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
         ("p99_ms", "p99 ms"), ("max_ms", "max ms")]


NEEDS_CNN_STORE = {"textserve-batched-1-cnn"}
ON_REQUEST = {"textserve-noop-2", "textserve-default-nohametrics"}  # not in the default set: named in --systems when wanted


def split_system(name: str) -> tuple[str, str | None]:
    """'SYSTEM@TREE' -> (SYSTEM, TREE); a plain name -> (name, None)."""
    base, sep, tree = name.partition("@")
    return (base, tree) if sep else (name, None)


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


def _short(value) -> str:
    if isinstance(value, dict):
        return "(a section)" if value else "{}"
    return "(absent)" if value is None else json.dumps(value)


def changes_line(changes: dict | None, environment: dict | None = None) -> str:
    """What a Serve variant changes in the shipped config, for the report; `environment`: the
    ingress settings the bench's environment set (see the report's header)."""
    if changes is None:
        return "Not this system: a separate program (bench/baselines)."
    ingress = ("ingress defaults as shipped except the environment named above" if environment
               else "ingress defaults as shipped")
    if not changes:
        return f"Config: cluster/serve_local.yaml as shipped, {ingress} (only store, port, log folder)."
    return "Changed from the shipped config: " + "; ".join(
        f"`{path}` {_short(a)} -> {_short(b)}" for path, (a, b) in changes.items()) + "."


def _line(name: str, row: dict) -> str:
    lo, hi = row.get("spread", {}).get("tps", (row["tps"], row["tps"]))
    return (f"{name:>22} {row['users']:>4} users: {row['tps']:8.1f} req/s ({lo:.0f}-{hi:.0f})  "
            f"mean {row['mean_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  failed {row['failed']}")


def _at(report: dict, name: str, users: int, table: str = "closed_loop") -> dict | None:
    rows = report["systems"].get(name, {}).get(table, [])
    return next((r for r in rows if r["users"] == users), None)


def _cell(row: dict, key: str) -> str:
    lo_hi = row.get("spread", {}).get(key)
    return f"{row[key]:.1f}" + (f" ({lo_hi[0]:.1f}-{lo_hi[1]:.1f})" if lo_hi and row.get("repeat", 1) > 1 else "")


# (numerator, denominator, what, goal): TPS ratios at every user count both systems ran.
RATIOS = [("textserve-batched-1", "textserve-noop-1", "this system (1 replica) / Serve's no-op floor (1 replica)", ">= 0.7x"),
          ("textserve-default", "tuned-single", "default config / tuned single process", ">= 0.8x"),
          ("textserve-noop-2", "tuned-single", "Serve's no-op floor (2 replicas) / tuned single process", ""),
          ("textserve-default", "textserve-noop-2", "default config / Serve's no-op floor (2 replicas)", ""),
          ("textserve-default-nohametrics", "textserve-default", "HAProxy metrics off / default config", ""),
          ("textserve-default", "flask-2017", "default config / the 2017 architecture", ">= 100x"),
          ("textserve-batched-1", "flask-2017", "this system (1 replica) / the 2017 architecture", ""),
          ("textserve-batched-1", "textserve-unbatched-1", "batched / unbatched", ""),
          ("textserve-batched-2", "textserve-batched-1", "2 replicas / 1 replica", ""),
          ("textserve-batched-1", "tuned-single", "this system (1 replica) / tuned single process", ""),
          ("textserve-batched-1-cnn", "textserve-batched-1", "CNN family / LSTM family (batched, 1 replica)", "")]


def paired_ratios(ra: dict, rb: dict, key: str = "tps") -> list[float]:
    """The ratio a/b of `key` within each repetition (with interleaved rounds, both systems measured
    minutes apart at most), sorted; NaN and zero denominators left out."""
    a, b = [r.get(key) for r in ra.get("runs", [])], [r.get(key) for r in rb.get("runs", [])]
    return sorted(x / y for x, y in zip(a, b) if x is not None and y and x == x and y == y)


def _paired(report: dict, ra: dict, rb: dict) -> str:
    """With interleaved rounds: the ratio within each round (both systems measured minutes apart
    at most), as median and range; '' otherwise."""
    if not report.get("interleaved"):
        return ""
    ratios = paired_ratios(ra, rb)
    if len(ratios) < 2:
        return ""
    return (f"; per round: median {statistics.median(ratios):.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f}x "
            f"over {len(ratios)} rounds")


CLIENT_TABLES = {"closed_loop": "the aiohttp client", "ab_closed_loop": "Apache Bench"}


def _cpu_table(report: dict, users: int, table: str = "closed_loop") -> list[str]:
    """Server CPU seconds per 1,000 answers at `users`, and each system's ratio to the tuned process."""
    rows = {name: row for name in report["systems"]
            if (row := _at(report, name, users, table)) and "cpu_s_per_1k" in row}
    if not rows:
        return []
    tuned = rows.get("tuned-single")
    out = [f"Work per request at {users} users, {CLIENT_TABLES[table]}: server CPU seconds per 1,000 answers (the "
           "system's processes; machine busy CPU minus the client's in brackets), median of the repetitions:", "",
           "| system | CPU-s / 1,000 answers | ratio to tuned-single |", "|---|---|---|"]
    for name, row in rows.items():
        ratio = f"{row['cpu_s_per_1k'] / tuned['cpu_s_per_1k']:.2f}x" if tuned and tuned["cpu_s_per_1k"] > 0 else "-"
        out.append(f"| {name} | {row['cpu_s_per_1k']:.2f} [{row['machine_cpu_s_per_1k']:.2f}] | {ratio} |")
    return out + [""]


REVISION_KEYS = [("tps", "TPS"), ("p50_ms", "p50"), ("p99_ms", "p99"), ("cpu_s_per_1k", "server CPU-s / 1k")]


def _ratio_cell(report: dict, ra: dict, rb: dict, key: str) -> str:
    """a/b of the medians, and with interleaved rounds the per-round ratios' median (min-max)."""
    if key not in ra or key not in rb or not rb[key] or rb[key] != rb[key]:
        return "-"
    cell = f"{ra[key] / rb[key]:.2f}x"
    rounds = paired_ratios(ra, rb, key) if report.get("interleaved") else []
    if len(rounds) >= 2:
        cell += f" (rounds {statistics.median(rounds):.2f}x, {rounds[0]:.2f}-{rounds[-1]:.2f})"
    return cell


def revision_lines(report: dict) -> list[str]:
    """Systems run from source trees (`--tree`): every later tree's figures over each earlier
    tree's, for the same system, users and client."""
    order = list(report.get("trees", {}))
    by_base: dict[str, list[str]] = {}
    for name in report["systems"]:
        base, tree = split_system(name)
        if tree in order:
            by_base.setdefault(base, []).append(name)
    out = []
    for base, names in by_base.items():
        names.sort(key=lambda n: order.index(split_system(n)[1]))
        pairs = [(later, earlier) for i, later in enumerate(names) for earlier in names[:i]]
        if not pairs:
            continue
        out += [f"Revisions of {base}: ratio of the medians, and in brackets the ratio within each round, median "
                "(min-max)" + ("" if report.get("interleaved") else " (not interleaved: no per-round ratios)")
                + "; above 1x is more TPS, more latency, more CPU per answer:", "",
                "| ratio | users | client | " + " | ".join(h for _, h in REVISION_KEYS) + " |",
                "|---|---|---|" + "---|" * len(REVISION_KEYS)]
        for later, earlier in pairs:
            for table, client in CLIENT_TABLES.items():
                for users in report["users"]:
                    ra, rb = _at(report, later, users, table), _at(report, earlier, users, table)
                    if ra and rb:
                        label = f"{split_system(later)[1]} / {split_system(earlier)[1]}"
                        out.append(f"| {label} | {users} | {client} | "
                                   + " | ".join(_ratio_cell(report, ra, rb, k) for k, _ in REVISION_KEYS) + " |")
        out.append("")
    return out


def summary_lines(report: dict) -> list[str]:
    out = []
    for users in report["users"]:
        for table, client in CLIENT_TABLES.items():
            if not any(_at(report, name, users, table) for name in report["systems"]):
                continue
            out += [f"TPS and latency at {users} users, {client}, median of {report.get('repeat', 1)} (min-max):", "",
                    "| system | TPS | p50 ms | p99 ms | failed (all repetitions) |", "|---|---|---|---|---|"]
            for name in report["systems"]:
                if row := _at(report, name, users, table):
                    out.append(f"| {name} | {_cell(row, 'tps')} | {_cell(row, 'p50_ms')} | {_cell(row, 'p99_ms')} | "
                               f"{row['failed']} |")
            out.append("")
            out += _cpu_table(report, users, table)
    for name, data in report["systems"].items():
        good = data["goodput"]
        out.append(f"- {name} goodput (p99 < 1 s, 0 failed): "
                   + (f"{good['tps']:.1f} req/s at {good['users']} users" if good else "none"))
    out.append("")
    for a, b, label, goal in RATIOS:
        for users in report["users"]:
            ra, rb = _at(report, a, users), _at(report, b, users)
            if ra and rb and rb["tps"] > 0:
                out.append(f"- {label}, TPS at {users} users: **{ra['tps'] / rb['tps']:.2f}x**"
                           + (f" (goal {goal})" if goal else "") + _paired(report, ra, rb))
    ra, rb = _at(report, "textserve-batched-1", 1), _at(report, "textserve-unbatched-1", 1)
    if ra and rb and rb["p50_ms"] > 0:
        out.append(f"- p50 at 1 user, batched / unbatched: **{ra['p50_ms'] / rb['p50_ms']:.2f}x** (goal <= 1.2x)")
    if revisions := revision_lines(report):
        out += [""] + revisions
    return out


def markdown(report: dict, image: str = "BENCHMARKS.png") -> str:
    ceiling = report["client_ceiling"]["tps"]
    out = [f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ", f"Date: {report['date']}  ",
           f"Model: {report.get('model', '?')}  ",
           *([f"Models: --store {report['models']['store']}; --cnn-store (the -cnn system) "
              f"{report['models']['cnn_store']}  "] if "cnn_store" in report.get("models", {}) else []),
           f"Client: {report.get('client', '?')}" + ("; and Apache Bench (`ab -l`, one text) right after each "
                                                       "aiohttp step" if "ab" in report.get("clients", []) else "")
           + "  ",
           f"Repetitions per step: {report.get('repeat', 1)}, {report['duration_s']:.0f} s each"
           + (", run in rounds over all systems (each system started afresh per round)" if report.get("interleaved")
              else "") + "; figures are medians, (min-max) where shown  ",
           *([f"Source trees (`--tree`; SYSTEM@NAME runs from NAME): " + "; ".join(
               f"{name} = {t['path']} at {(t['commit'] or '?')[:10]}" + (" with uncommitted changes" if t["modified"]
                                                                        else "") + f" ({t['subject']})"
               for name, t in report["trees"].items()) + "  "] if report.get("trees") else []),
           *([f"Environment set for every system: " + ", ".join(f"`{k}={v}`" for k, v in report["environment"].items())
              + "  "] if report.get("environment") else []),
           f"Client ceiling (the same aiohttp client against a no-op aiohttp server, {max(report['users'])} users): "
           f"{ceiling:.0f} req/s. Rows above 80% of it are marked *client-bound*.", "",
           f"![TPS and p99 against users]({image})", "", "## Summary", "", *summary_lines(report)]
    for name, data in report["systems"].items():
        out += ["", f"## {name}", "", data["description"], "", changes_line(data.get("changes_from_shipped", None), report.get("environment")), "",
                "| " + " | ".join(h for _, h in TABLE) + " |", "|" + "---|" * len(TABLE)]
        for row in data["closed_loop"]:
            cells = [_cell(row, k) if isinstance(row[k], float) else str(row[k]) for k, _ in TABLE]
            flag = " *client-bound*" if row["tps"] > 0.8 * ceiling else ""
            out.append("| " + " | ".join(cells) + f" |{flag}")
        if data["open_loop"]:
            out += ["", "Open loop (Poisson arrivals; latency from the scheduled time):", "",
                    "| offered req/s | TPS | p50 ms | p99 ms | failed | late | dropped |", "|---|---|---|---|---|---|---|"]
            out += [f"| {r['offered_rate']:.0f} | {r['tps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                    f"{r['failed']} | {r['late']} | {r['dropped']} |" for r in data["open_loop"]]
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_p99) = plt.subplots(1, 2, figsize=(13, 5))
    for name, data in report["systems"].items():
        rows = data["closed_loop"]
        ax_tps.plot([r["users"] for r in rows], [r["tps"] for r in rows], marker="o", label=name)
        ax_p99.plot([r["users"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=name)
    ax_tps.set(xlabel="concurrent users", ylabel="requests/s (TPS)", title="Throughput")
    ax_p99.set(xlabel="concurrent users", ylabel="p99 latency (ms)", title="p99 latency", yscale="log")
    ax_p99.axhline(1000, color="grey", linestyle="--", linewidth=1, label="1 s goal")
    for ax in (ax_tps, ax_p99):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(report.get("model", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
