"""Apache Bench, the 2017 study's client, as a load step: `ab -l -c USERS -t SECONDS` with a new
connection per request (no `-k` unless asked), read back into the same figures as bench.load's
steps. `-l`: answers differ in length (each names its batch size and scores), and without it ab
counts every answer whose length differs from the first as failed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

AB_PERCENTILES = (50, 66, 75, 80, 90, 95, 98, 99, 100)


def ab_binary() -> str:
    found = shutil.which("ab")
    if not found:
        raise FileNotFoundError("Apache Bench (ab) is not installed: apt-get install apache2-utils")
    return found


def parse_ab(text: str, users: int) -> dict:
    """ab's report as a step summary (the keys of bench.stats.StepResult.summary that ab gives)."""
    def number(pattern: str, cast=int, default=0):
        found = re.search(pattern, text, re.MULTILINE)
        return cast(found.group(1)) if found else default
    pct = {int(p): float(ms) for p, ms in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.MULTILINE)}
    complete, failed, non_2xx = (number(r"^Complete requests:\s+(\d+)"), number(r"^Failed requests:\s+(\d+)"),
                                 number(r"^Non-2xx responses:\s+(\d+)"))
    duration = number(r"^Time taken for tests:\s+([\d.]+)", float, 0.0)
    answered = complete - failed - non_2xx  # ab counts a non-2xx answer as complete, not failed
    return {"users": users, "duration_s": duration, "tps": answered / duration if duration else 0.0,
            "mean_ms": number(r"^Time per request:\s+([\d.]+) \[ms\] \(mean\)$", float, float("nan")),
            "transfer_kb_s": number(r"^Transfer rate:\s+([\d.]+)", float, 0.0),
            "complete": answered, "failed": failed + non_2xx,
            "failed_by_kind": {"failed": failed, "non_2xx": non_2xx},
            "p50_ms": pct.get(50, float("nan")), "p90_ms": pct.get(90, float("nan")),
            "p99_ms": pct.get(99, float("nan")), "max_ms": pct.get(100, float("nan")), "client": "ab"}


def ab_step(url: str, users: int, duration_s: float, text: str, keepalive: bool = False) -> dict:
    """One closed-loop step of Apache Bench: `users` concurrent, for `duration_s` seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        body.write('{"text": %s}' % _json_string(text))
        body.flush()
        cmd = [ab_binary(), "-l", "-q", "-c", str(users), "-t", str(duration_s), "-n", "10000000", "-s", "30",
               "-p", body.name, "-T", "application/json", *(["-k"] if keepalive else []), url]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120)
    if run.returncode != 0:  # e.g. a reset connection: ab stops and reports nothing usable
        return {**parse_ab("", users), "failed": 1, "error": (run.stderr or run.stdout).strip()[-300:]}
    return parse_ab(run.stdout, users)


def _json_string(text: str) -> str:
    import json

    return json.dumps(text)
