"""python -m online_learning send: post feedback events to /v1/feedback.

One event from flags, or a .jsonl/.csv file (text, label and optionally event_id per row)
streamed in batches with a progress bar. 429 and 503 are retried after the server's Retry-After,
507 (the feedback log's disk is full: nothing was written) after a backoff from 0.5 s doubling up
to the server's Retry-After; a request is tried at most 21 times (for 507, about 7.5 minutes of
waits). A summary is printed at the end (accepted, duplicates, conflicts, failed), and the exit
status is 1 when anything was refused. Event ids default to a hash of the event's content (text,
label): the same event sent again is acknowledged as a duplicate without being applied twice, and
a different file with the same name is learned all the same.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

RETRY_STATUSES = {429, 503, 507}
FIRST_BACKOFF_S = 0.5  # 507: the first wait; doubled each retry, never above the server's Retry-After


def content_id(text: str, label: str) -> str:
    """The default event id: a hash of what the event says, so only a true resend is a duplicate."""
    return hashlib.sha256(f"{text}\t{label}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def read_events(path: str) -> list[dict]:
    from train.data import read_user_file  # same checks (columns, empty text, UTF-8) as training data

    rows = read_user_file(path)
    ids = _explicit_ids(path)
    return [{"event_id": ids[i] if i < len(ids) and ids[i] else content_id(ex.text, ex.label),
             "text": ex.text, "label": ex.label} for i, ex in enumerate(rows)]


def _explicit_ids(path: str) -> list[str | None]:
    text = Path(path).read_text(encoding="utf-8-sig")
    if path.lower().endswith(".csv"):
        return [row.get("event_id") for row in csv.DictReader(text.splitlines())]
    return [json.loads(line).get("event_id") for line in text.splitlines() if line.strip()]


def retry_wait_s(status: int, retry_after: str | None, retry: int) -> float:
    """Seconds before retry number `retry` (0 for the first) of a request answered `status`.

    429/503: what the server says (rate limit, a learner handing over). 507: the log's disk is
    full until someone frees space or the log is compacted; a short wait first, then longer ones
    up to the server's Retry-After (30 s), so a quick fix is noticed and a long one not hammered."""
    try:
        hinted = max(0.0, float(retry_after)) if retry_after else 1.0
    except ValueError:  # an HTTP date: not what this server sends
        hinted = 1.0
    if status == 507:
        return min(hinted, FIRST_BACKOFF_S * 2**retry)
    return hinted


def post_with_retries(session: requests.Session, url: str, events: list[dict], token: str,
                      max_retries: int = 20) -> tuple[int, dict]:
    for attempt in range(max_retries + 1):
        try:
            r = session.post(url, json=events, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        except requests.ConnectionError:
            if attempt == max_retries:
                raise
            time.sleep(min(2**attempt, 10) * 0.25)
            continue
        if r.status_code not in RETRY_STATUSES or attempt == max_retries:
            return r.status_code, r.json() if r.content else {}
        time.sleep(retry_wait_s(r.status_code, r.headers.get("Retry-After"), attempt))
    raise AssertionError("unreachable")


def send(url: str, events: list[dict], token: str, batch: int = 64, progress: bool = True,
         max_retries: int = 20) -> dict:
    """Post `events` in batches; a batch refused for an event_id conflict is resent without the
    conflicting event (the server names it), so one clash does not cost its neighbours."""
    summary = {"sent": 0, "accepted": 0, "duplicates": 0, "conflicts": 0, "failed": 0, "errors": []}
    endpoint = url.rstrip("/") + "/v1/feedback"
    with requests.Session() as session, tqdm(total=len(events), unit="event", disable=not progress) as bar:
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            summary["sent"] += len(chunk)
            while chunk:
                status, body = post_with_retries(session, endpoint, chunk, token, max_retries)
                clash = (body.get("error") or {}).get("event_id") if status == 409 else None
                refused = [e for e in chunk if e["event_id"] == clash]
                if status == 202:
                    summary["accepted"] += body["accepted"]
                    summary["duplicates"] += body["duplicates"]
                elif refused:
                    summary["conflicts"] += len(refused)
                    summary["failed"] += len(refused)
                    summary["errors"].append(f"event_id {clash!r}: HTTP 409 {body['error']['message']}")
                    chunk = [e for e in chunk if e["event_id"] != clash]
                    continue
                else:
                    summary["failed"] += len(chunk)
                    summary["errors"].append(f"events {start}-{start + len(chunk) - 1}: HTTP {status} {body.get('error')}")
                break
            bar.update(min(batch, len(events) - start))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online_learning send", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve app (default http://127.0.0.1:8000)")
    p.add_argument("--token", help="bearer token (default: $TEXTSERVE_FEEDBACK_TOKEN)")
    p.add_argument("--file", help=".jsonl or .csv with text, label (and event_id) per row")
    p.add_argument("--text", help="one event's text")
    p.add_argument("--label", help="one event's label")
    p.add_argument("--event-id", help="one event's id (default: a hash of text and label)")
    p.add_argument("--batch", type=int, default=64, help="events per request (default 64)")
    a = p.parse_args(argv)
    token = a.token or os.environ.get("TEXTSERVE_FEEDBACK_TOKEN")
    if not token:
        p.error("no token: pass --token or set TEXTSERVE_FEEDBACK_TOKEN")
    if bool(a.file) == bool(a.text):
        p.error("give either --file FILE or --text TEXT --label LABEL")
    if a.file:
        from train.data import DataFileError

        try:
            events = read_events(a.file)
        except DataFileError as err:
            p.error(str(err))
    else:
        if not a.label:
            p.error("--text needs --label")
        event_id = a.event_id or content_id(a.text, a.label)
        events = [{"event_id": event_id, "text": a.text, "label": a.label}]
    summary = send(a.url, events, token, a.batch, progress=len(events) > 1)
    print(f"sent {summary['sent']}: accepted {summary['accepted']}, duplicates {summary['duplicates']}, "
          f"refused {summary['failed']} (of them event_id conflicts: {summary['conflicts']})")
    for line in summary["errors"][:10]:
        print("  " + line, file=sys.stderr)
    return 1 if summary["failed"] else 0
