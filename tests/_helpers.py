"""Small helpers for tests: deadline polling and a tiny labelled data file."""

from __future__ import annotations

import json
import time
from pathlib import Path


def wait_until(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s (last: {last!r})")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def fast_serve_env() -> dict:
    from serve.settings import FAST_INGRESS_ENV

    return dict(FAST_INGRESS_ENV)
