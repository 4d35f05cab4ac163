"""Per-step statistics of a load run: the 2017 table's columns plus latency percentiles."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepResult:
    users: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)  # completed 2xx requests only
    statuses: Counter = field(default_factory=Counter)  # HTTP status -> count
    timeouts: int = 0
    connection_errors: int = 0
    bytes_received: int = 0
    late: int = 0  # open loop: sent over 10 ms after the scheduled time
    dropped: int = 0  # open loop: not sent, too many outstanding
    offered_rate: float | None = None  # open loop: requests/s scheduled

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) * 1000.0
        complete = int(sum(n for s, n in self.statuses.items() if 200 <= s < 300))
        non_2xx = {str(s): n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300}
        failed = sum(non_2xx.values()) + self.timeouts + self.connection_errors + self.dropped
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        return {
            "users": self.users,
            "duration_s": round(self.duration_s, 3),
            "tps": complete / self.duration_s if self.duration_s else 0.0,
            "mean_ms": float(lat.mean()) if lat.size else float("nan"),
            "transfer_kb_s": self.bytes_received / 1024 / self.duration_s if self.duration_s else 0.0,
            "complete": complete,
            "failed": failed,
            "failed_by_kind": {"non_2xx": non_2xx, "timeouts": self.timeouts,
                               "connection_errors": self.connection_errors, "dropped": self.dropped},
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
            **({"offered_rate": self.offered_rate, "late": self.late, "dropped": self.dropped}
               if self.offered_rate is not None else {}),
        }


def goodput(summaries: list[dict], p99_limit_ms: float = 1000.0) -> dict | None:
    """The step with the highest TPS whose p99 is under the limit and that had no failures."""
    good = [s for s in summaries if s["failed"] == 0 and s["complete"] and s["p99_ms"] < p99_limit_ms]
    return max(good, key=lambda s: s["tps"]) if good else None


SPREAD_KEYS = ("tps", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "transfer_kb_s")
CPU_KEYS = ("cpu_s_per_1k", "machine_cpu_s_per_1k")  # bench.cpu_cost, where the step measured CPU


def combine_runs(runs: list[dict]) -> dict:
    """Repetitions of one step as one row: medians of the figures, (min, max) of each in
    `spread`, failed and complete summed over all repetitions, each repetition under `runs`."""
    row = dict(runs[0])
    row["spread"] = {}
    for key in SPREAD_KEYS + tuple(k for k in CPU_KEYS if k in row):
        values = [r[key] for r in runs if r[key] == r[key]]  # NaN (no answer at all) left out
        row[key] = float(np.median(values)) if values else float("nan")
        # NaN left out of min/max too: with NaN they depend on the order
        row["spread"][key] = [min(values), max(values)] if values else [float("nan"), float("nan")]
    row["failed"] = sum(r["failed"] for r in runs)
    row["complete"] = sum(r["complete"] for r in runs)
    row["repeat"] = len(runs)
    row["runs"] = runs
    return row
