"""python -m train store ls|gc: show and clean the model store."""

from __future__ import annotations

import argparse
import json
import sys

from train.store import DEFAULT_GRACE_S, ModelStore


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _age(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= width:
            return f"{s / width:.1f}{unit}"
    return f"{s:.0f}s"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train store", description="Show and clean the model store.")
    p.add_argument("--store", metavar="URI", help="model store (default: $TEXTSERVE_MODEL_STORE or ./artifacts/models)")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="every version: number, kind, size, committed or not, age")
    ls.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    gc = sub.add_parser("gc", help="delete old versions and the leftovers of crashed publishes")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the newest N committed versions")
    gc.add_argument("--keep", default="", metavar="V,V", help="also keep these versions (comma-separated)")
    gc.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S,
                    help=f"an uncommitted version is a crashed publish once untouched this long (default {DEFAULT_GRACE_S:.0f})")
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    for sp in (ls, gc):  # --store accepted after the subcommand too
        sp.add_argument("--store", metavar="URI", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    store = ModelStore(a.store)
    if a.command == "ls":
        rows = store.describe()
        if a.json:
            for r in rows:
                print(json.dumps(r.as_dict()))
            return 0
        print(f"{store!r}: {sum(r.committed for r in rows)} committed version(s)")
        print(f"{'version':>8}  {'kind':<16} {'size':>9}  {'state':<11} {'age':>6}")
        for r in rows:
            state = "committed" if r.committed else "UNCOMMITTED"
            print(f"{r.version:>8}  {(r.kind or 'train') if r.committed else '-':<16} {_size(r.bytes):>9}  "
                  f"{state:<11} {_age(r.age_s):>6}")
        return 0
    try:
        keep = {int(v) for v in a.keep.split(",") if v.strip()}
        removed = store.gc(keep_last=a.keep_last, keep=keep, grace_s=a.grace_s, dry_run=a.dry_run)
    except ValueError as err:
        p.error(str(err))
    verb = "would delete" if a.dry_run else "deleted"
    print(f"{verb} versions {removed['versions'] or 'none'}; uncommitted leftovers {removed['uncommitted'] or 'none'}")
    print(json.dumps(removed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
