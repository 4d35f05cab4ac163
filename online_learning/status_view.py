"""python -m online_learning status: the learning loop at a glance, in a terminal.

Reads the authenticated `GET /v1/model` (the operator token, `Authorization: Bearer`, from
TEXTSERVE_FEEDBACK_TOKEN or --token) and prints a compact table: each replica the learner knows
(version, lineage, log offset, staleness, health), the learner (version, backlog, hold-backs), its
last publishes and hold-backs with their reasons, and the feedback outcome counts. `--watch N`
redraws every N seconds until Ctrl-C. When the app cannot be reached or the token is missing or
wrong, it says which, and how to fix it (exit status 2; 1 when the app answered with an error).

The answering replica reports its own staleness and readiness exactly; for the others, the
learner's view: the identity each last reported, so a replica not on the learner's current
version has been behind at least since that version was published (shown as ">=").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

__all__ = ["fetch", "render", "main", "StatusError"]

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_ENV = "TEXTSERVE_FEEDBACK_TOKEN"
HISTORY_ROWS = 8  # the last publishes and hold-backs shown


class StatusError(Exception):
    """What went wrong, said for the operator; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fetch(url: str, token: str, timeout: float = 5.0) -> dict:
    """The operator view of GET {url}/v1/model, or StatusError saying what is wrong."""
    endpoint = url.rstrip("/") + "/v1/model"
    req = urllib.request.Request(endpoint, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        detail = _error_message(err.read())
        if err.code in (401, 403):
            raise StatusError(f"{endpoint} refused the token (HTTP {err.code}{detail}); use the operator token the app "
                              f"was started with ({TOKEN_ENV} where Serve runs)") from None
        if err.code == 429:
            raise StatusError(f"{endpoint} answered 429 (too many failed authentications{detail}); wait "
                              f"{err.headers.get('Retry-After', 'a few')} s and check the token") from None
        raise StatusError(f"{endpoint} answered HTTP {err.code}{detail}", code=1) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StatusError(f"cannot reach the app at {url} ({reason}); is it running? Start it with "
                          f"`python -m serve run` or pass --url") from None
    try:
        info = json.loads(body)
    except ValueError:
        raise StatusError(f"{endpoint} did not answer JSON; is --url the textserve app?", code=1) from None
    if not isinstance(info, dict) or "model_version" not in info:
        raise StatusError(f"{endpoint} answered something else than textserve's /v1/model; is --url right?", code=1)
    if "replica" not in info:  # a wrong token gets the public answer (versions and labels only)
        raise StatusError(f"{endpoint} answered without operator details: the token is not the app's operator "
                          f"token ({TOKEN_ENV} where Serve runs)")
    return info


def _error_message(body: bytes) -> str:
    try:
        return ": " + json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""


def _short(name: str | None, n: int = 12) -> str:
    if not name:
        return "-"
    return name if len(name) <= n else name[:n - 1] + "~"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.0f}m"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _replica_rows(info: dict, learner: dict, now: float) -> list[list[str]]:
    bound = learner.get("max_staleness_s")
    current = (learner.get("lineage"), learner.get("version"))
    published_at = learner.get("published_at")
    answering = info.get("replica")
    replicas = dict(learner.get("replicas") or {})
    if answering and answering not in replicas:  # the learner has no report from it yet (or is down)
        replicas[answering] = {"lineage": info.get("lineage"), "version": info.get("model_version"),
                               "log_offset": info.get("log_offset"), "reported_at": None}
    rows = []
    for name, rep in sorted(replicas.items()):
        on_current = (rep.get("lineage"), rep.get("version")) == current
        if name == answering:
            stale = info.get("staleness_s")
            staleness = _secs(stale)
            health = info.get("readiness", "?") + (" STALE" if info.get("stale") else "")
        else:
            stale = 0.0 if on_current or not published_at else now - published_at
            staleness = _secs(stale) if on_current or not published_at else ">=" + _secs(stale)
            health = "current" if on_current else "behind"
            if stale is not None and bound and stale > bound:
                health += " STALE"
        if current[0] is not None and rep.get("lineage") != current[0]:
            health += " (other lineage)"
        seen = rep.get("reported_at")
        rows.append([_short(name, 14) + ("*" if name == answering else ""), str(rep.get("version")),
                     _short(rep.get("lineage")), str(rep.get("log_offset")), staleness, health,
                     _secs(now - seen) + " ago" if seen else "-"])
    return rows


def _history_rows(learner: dict) -> list[list[str]]:
    rows = []
    for entry in (learner.get("history") or [])[-HISTORY_ROWS:]:
        when = time.strftime("%H:%M:%S", time.localtime(entry.get("time", 0)))
        if entry.get("published"):
            what = f"published v{entry.get('version')}"
            why = f"{entry.get('bytes', 0)} B" + (" (new lineage)" if entry.get("base") is not None
                                                  and not entry.get("events") else "")
        elif entry.get("replay"):
            what, why = "replayed", f"offset {entry.get('log_offset')}"
        elif "rebased_on" in entry:
            what, why = "adopting", f"store v{entry['rebased_on']}"
        elif "refused" in entry and "reason" in entry:
            what, why = f"refused v{entry['refused']}", entry["reason"]
        elif "reason" in entry:
            what, why = "held back", entry["reason"]
        elif entry.get("refused"):
            what, why = "refused events", f"{entry['refused']}: {entry.get('refused_reason', '')}"
        else:
            what, why = "no candidate", ""
        rows.append([when, what, str(entry.get("events", 0)), why[:70]])
    return rows


def render(info: dict, url: str = "", now: float | None = None) -> str:
    """The table for one /v1/model answer (operator view)."""
    now = time.time() if now is None else now
    learner = info.get("learner")
    out = [f"textserve at {url}  {time.strftime('%H:%M:%S', time.localtime(now))}  "
           f"(answered by replica {_short(info.get('replica'), 14)}*)"]
    if learner is None:
        out += ["", "learner: none (online learning is off in this application)",
                f"replica: v{info.get('model_version')} {info.get('readiness')}"]
        return "\n".join(out)
    if "error" in learner:
        out += ["", f"learner: UNREACHABLE ({learner['error']})",
                f"replica: v{info.get('model_version')}, lineage {_short(info.get('lineage'))}, "
                f"staleness {_secs(info.get('staleness_s'))}, {info.get('readiness')}"]
        return "\n".join(out)
    state = ("standby" if learner.get("standby") else "fenced" if learner.get("fenced")
             else "replaying" if learner.get("replaying") else "owner")
    log_len, judged = learner.get("log_length"), learner.get("judged_offset")
    backlog = max(0, log_len - 1 - judged) if isinstance(log_len, int) and isinstance(judged, int) else None
    out += ["", f"learner: v{learner.get('version')} lineage {_short(learner.get('lineage'))} ({state}, epoch "
                f"{learner.get('epoch')})  staleness {_secs(learner.get('staleness_s'))} "
                f"(bound {_secs(learner.get('max_staleness_s'))})",
            f"  log {log_len if log_len is not None else '-'} events, judged to {judged}, applied to "
            f"{learner.get('applied_offset')}; backlog (unjudged) {backlog if backlog is not None else '-'}; "
            f"held back {learner.get('held_back', 0)} rounds; refused {learner.get('refused', 0)} events"]
    if learner.get("fenced"):
        out.append(f"  FENCED: {learner['fenced']}")
    out += ["", "replicas (* answered this request)"]
    out += _table(["replica", "version", "lineage", "offset", "staleness", "health", "reported"],
                  _replica_rows(info, learner, now))
    history = _history_rows(learner)
    out += ["", f"last {len(history)} rounds"]
    out += _table(["time", "what", "events", "reason / size"], history) if history else ["  none yet"]
    outcomes = learner.get("feedback_outcomes")
    marks = (learner.get("log") or {}).get("marks")
    out += ["", "feedback"]
    if outcomes:
        for group in ("requests", "events", "held_back"):
            counts = outcomes.get(group) or {}
            out.append(f"  {group}: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    else:  # a learner that does not count outcomes: what status() always has
        out.append(f"  accepted {log_len if log_len is not None else '-'} events (log), refused "
                   f"{learner.get('refused', 0)}, held back {learner.get('held_back', 0)} rounds")
    if marks:
        out.append("  log marks: " + ", ".join(f"{k} {v}" for k, v in sorted(marks.items())))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online_learning status",
                                description="The learning loop at a glance, from the app's GET /v1/model.")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the Serve app (default {DEFAULT_URL})")
    p.add_argument("--token", help=f"the operator token (default: ${TOKEN_ENV})")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    a = p.parse_args(argv)
    if a.watch is not None and a.watch <= 0:
        p.error("--watch takes a number of seconds above 0")
    token = a.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"no operator token: set {TOKEN_ENV} (the token the app was started with) or pass --token",
              file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                text = render(fetch(a.url, token), a.url)
                code = 0
            except StatusError as err:
                if a.watch is None:
                    print(err, file=sys.stderr)
                    return err.code
                text, code = f"{time.strftime('%H:%M:%S')}  {err}", err.code  # keep watching: it may come back
            if a.watch is None:
                print(text)
                return code
            print(("\x1b[H\x1b[2J" if tty else "\n") + text, flush=True)
            time.sleep(a.watch)  # the refresh period the operator asked for
    except KeyboardInterrupt:
        return 0
