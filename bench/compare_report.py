"""The report of `python -m bench compare` (bench/compare.py): its Markdown tables, the ratios
between systems (paired per round when interleaved, and between source trees), the summary
printed at the end, and the plot."""

from __future__ import annotations

import json
import statistics

from bench.systems import split_system

TABLE = [("users", "users"), ("tps", "TPS"), ("mean_ms", "mean ms"), ("transfer_kb_s", "KB/s"),
         ("complete", "complete"), ("failed", "failed"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
         ("p99_ms", "p99 ms"), ("max_ms", "max ms")]


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
