"""python -m bench serving: the Serve app's variants side by side, measured in one run.

Variants: fast ingress batched (1 and 2 replicas), fast ingress unbatched, Serve's default
ingress batched. Writes docs/SERVING_BENCH.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from tqdm import tqdm

from bench.load import bench_texts, closed_loop
from bench.stats import goodput
from bench.systems import ServeVariant, start_variant

VARIANTS = {
    "fast-batched-1": ServeVariant("fast-batched-1"),
    "fast-batched-2": ServeVariant("fast-batched-2", replicas=2),
    "fast-batched-wait2ms-1": ServeVariant("fast-batched-wait2ms-1", batch_wait_timeout_s=0.002),
    "fast-batched-nowait-1": ServeVariant("fast-batched-nowait-1", batch_wait_timeout_s=0.0),
    "fast-unbatched-1": ServeVariant("fast-unbatched-1", max_batch_size=1),
    "default-batched-1": ServeVariant("default-batched-1", fast_ingress=False),
}
COLUMNS = ["users", "tps", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "transfer_kb_s", "complete", "failed"]


def run(variants: list[str], users: list[int], duration_s: float, store: str, warmup_s: float) -> dict:
    texts = bench_texts()
    report = {"command": "", "machine": f"{platform.node()} {platform.machine()}, 2 cores", "steps": {}}
    for name in variants:
        with start_variant(VARIANTS[name], store) as system:
            url = f"{system.url}/v1/predict"
            asyncio.run(closed_loop(url, min(users), warmup_s, texts))  # trace + warm caches
            rows = []
            for n in tqdm(users, desc=name, unit="step"):
                rows.append(asyncio.run(closed_loop(url, n, duration_s, texts)).summary())
                tqdm.write(format_row(name, rows[-1]))
            report["steps"][name] = {"rows": rows, "goodput": goodput(rows)}
    return report


def format_row(name: str, row: dict) -> str:
    return (f"{name:>18} users {row['users']:>4}: {row['tps']:8.1f} req/s  mean {row['mean_ms']:7.1f} ms  "
            f"p50 {row['p50_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}")


def markdown(report: dict) -> str:
    out = [f"Command: `{report['command']}`  \nMachine: {report['machine']} (client and server share it)\n"]
    for name, data in report["steps"].items():
        out.append(f"\n### {name}\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        for row in data["rows"]:
            out.append("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench serving", description=__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--users", default="1,64,400", help="concurrent users per step (default 1,64,400)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per step (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per system (default 3)")
    p.add_argument("--store", required=True, help="model store holding the model to serve")
    p.add_argument("--out", default="docs/SERVING_BENCH", help="report path without extension")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    users = [int(u) for u in a.users.split(",")]
    report = run(names, users, a.duration, a.store, a.warmup)
    report["command"] = "python -m bench serving " + " ".join(argv or __import__("sys").argv[1:])
    report["date"] = time.strftime("%Y-%m-%d")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(report, indent=2))
    Path(a.out + ".md").write_text(markdown(report))
    print(f"wrote {a.out}.md and {a.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
