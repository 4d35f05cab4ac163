"""The feedback log on real files: segments, compaction, id indexes, failed writes, the read-only
reader, marks, and bounded growth. Real OS failures (RLIMIT_FSIZE in a child process), real
concurrent processes; no mocks. No Ray or TensorFlow: runs without the heavy lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from online_learning.feedback_log import (
    CorruptLog,
    EventIdConflict,
    FeedbackEvent,
    FeedbackLog,
    FeedbackLogReader,
    OffsetCompacted,
)

ROOT = Path(__file__).resolve().parents[1]


def ev(i, label="HassTurnOn", text=None):
    return FeedbackEvent(f"id-{i}", text if text is not None else f"text {i}", label)


def fill(log, start, stop, batch=7):
    for lo in range(start, stop, batch):
        log.append([ev(i) for i in range(lo, min(stop, lo + batch))])


def files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("feedback-*.jsonl"))


def run_child(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh Python (the repo on its path); it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rotation_keeps_offsets_dense_and_reads_open_only_what_they_need(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10)
    fill(log, 0, 100)  # batches of 7 never split: a segment closes after the batch that fills it
    names = segments(tmp_path)
    firsts = [int(n[9:21]) for n in names]
    assert firsts == [0, 14, 28, 42, 56, 70, 84, 98] and len(log) == 100
    assert [e.offset for e in log.read_from(0)] == list(range(100))
    for start in (0, 13, 14, 15, 50, 97, 99):
        assert [e.event_id for e in log.read_from(start)] == [f"id-{i}" for i in range(start, 100)]
    assert log.read_from(100) == [] and log.read_from(1000) == []
    assert [e.offset for e in log.read_from(12, limit=5)] == [12, 13, 14, 15, 16]
    chunks, at = [], 0
    while chunk := log.read_from(at, limit=16):  # the learner's bounded reads
        chunks.append(chunk)
        at = chunk[-1].offset + 1
    assert [e.offset for c in chunks for e in c] == list(range(100)) and max(map(len, chunks)) == 16
    # A read from the middle opens only the segments from there on: delete an older one and read.
    (tmp_path / names[0]).rename(tmp_path / "moved-away")
    assert [e.offset for e in log.iter_from(60, limit=3)] == [60, 61, 62]
    (tmp_path / "moved-away").rename(tmp_path / names[0])
    log.close()
    by_size = FeedbackLog(tmp_path / "bytes", segment_bytes=2000)  # the size limit rotates too
    fill(by_size, 0, 200)
    assert len(segments(tmp_path / "bytes")) > 5
    assert all(p.stat().st_size < 2000 + 7 * 120 for p in (tmp_path / "bytes").glob("*.jsonl"))
    assert [e.offset for e in FeedbackLogReader(tmp_path / "bytes").read_from(0)] == list(range(200))


def test_a_single_file_log_of_earlier_versions_is_migrated(tmp_path):
    lines = [{"offset": i, "event_id": f"id-{i}", "text": f"text {i}", "label": "HassTurnOn", "ts": 1.0} for i in range(5)]
    (tmp_path / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"offset": 5, "ev')
    before = files(tmp_path)
    assert [e.offset for e in FeedbackLogReader(tmp_path).read_from(0)] == [0, 1, 2, 3, 4]
    assert files(tmp_path) == before  # the reader neither renames nor truncates
    log = FeedbackLog(tmp_path)
    assert segments(tmp_path) == ["feedback-000000000000.jsonl"] and not (tmp_path / "feedback.jsonl").exists()
    assert len(log) == 5
    assert log.append([ev(4), ev(5)]) == [(4, True), (5, False)]
    with pytest.raises(EventIdConflict):
        log.append([ev(2, label="HassTurnOff")])
    assert [e.offset for e in log.read_from(0)] == list(range(6))


def test_reopen_drops_a_torn_batch_in_the_active_segment(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10)
    fill(log, 0, 30)
    active = log.active_path
    log.close()
    good = active.read_bytes()
    # A crash in the middle of a 3-event batch: two complete lines, the third torn. The batch was
    # never fsynced whole, so never acknowledged: all of it goes, not only the torn line.
    torn = b"".join(json.dumps({"offset": o, "event_id": f"id-{o}", "text": "t", "label": "L", "ts": 1.0,
                                "end": 32}).encode() + b"\n" for o in (30, 31)) + b'{"offset": 32, "event_id": "id'
    active.write_bytes(good + torn)
    assert [e.offset for e in FeedbackLogReader(tmp_path).read_from(25)] == [25, 26, 27, 28, 29]
    again = FeedbackLog(tmp_path, segment_events=10)
    assert len(again) == 30 and active.read_bytes() == good
    assert again.append([ev(3), ev(30), ev(29)]) == [(3, True), (30, False), (29, True)]
    assert [e.offset for e in again.read_from(0)] == list(range(31))


def test_conflicts_and_duplicates_across_sealed_segments_write_nothing(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10)
    fill(log, 0, 40)
    before = files(tmp_path)
    with pytest.raises(EventIdConflict, match="'id-3'") as err:  # id-3 is in the first, sealed segment
        log.append([ev(100), ev(3, label="HassTurnOff")])
    assert err.value.offset == 3
    with pytest.raises(EventIdConflict, match="'id-101'"):  # twice in one batch with two payloads
        log.append([ev(101), ev(101, text="other")])
    assert files(tmp_path) == before and len(log) == 40
    assert log.append([ev(3), ev(17), ev(39), ev(40)]) == [(3, True), (17, True), (39, True), (40, False)]
    log.close()
    reopened = FeedbackLog(tmp_path, segment_events=10)
    with pytest.raises(EventIdConflict, match="'id-17'"):
        reopened.append([ev(17, text="changed")])
    assert reopened.append([ev(17)]) == [(17, True)]


def test_a_missing_or_damaged_id_index_is_rebuilt_from_its_segment(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10)
    fill(log, 0, 50)
    log.close()
    sidecars = sorted(tmp_path.glob("*.ids.npy"))
    assert len(sidecars) == 3
    sidecars[0].unlink()
    sidecars[1].write_bytes(sidecars[1].read_bytes()[:100])
    log = FeedbackLog(tmp_path, segment_events=10)
    assert sorted(tmp_path.glob("*.ids.npy")) == sidecars
    with pytest.raises(EventIdConflict, match="'id-2'"):
        log.append([ev(2, label="x")])
    assert log.append([ev(2), ev(20)]) == [(2, True), (20, True)]


def test_compaction_deletes_only_whole_old_segments_and_keeps_resends_duplicates(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=20)
    fill(log, 0, 100)  # segments start at 0, 14, 28, 42, 56, 70, 84, 98
    log.mark([5, 40, 41, 60], "holdout")
    log.mark(range(42, 56), "rejected")
    assert log.compact(45) == 42  # 0..41 go; the segment holding 42..55 holds offsets >= 45: stays
    assert log.first_offset == 42 and segments(tmp_path)[0] == "feedback-000000000042.jsonl"
    assert log.compact(45) == 0
    assert log.compact(1000) == 28  # retain_events=20 of 100: the cut is at 80; 42..69 go
    assert log.first_offset == 70 and len(segments(tmp_path)) == 3
    with pytest.raises(OffsetCompacted, match="starts at offset 70") as err:
        log.read_from(69)
    assert (err.value.offset, err.value.first_offset) == (69, 70)
    assert [e.offset for e in log.read_from(70)] == list(range(70, 100))
    assert log.append([ev(0), ev(41), ev(69), ev(100)]) == [(0, True), (41, True), (69, True), (100, False)]
    with pytest.raises(EventIdConflict, match="'id-5'"):
        log.append([ev(5, label="HassTurnOff")])
    assert json.loads((tmp_path / "marks.jsonl").read_text().strip() or "null") is None  # marks < 70 dropped
    log.mark([71], "holdout")
    log.close()
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=0)
    assert log.first_offset == 70 and len(log) == 101
    assert log.append([ev(1), ev(50), ev(99)]) == [(1, True), (50, True), (99, True)]
    with pytest.raises(EventIdConflict):
        log.append([ev(50, text="changed")])
    assert [(e.offset, e.holdout) for e in log.read_from(70, limit=3)] == [(70, False), (71, True), (72, False)]
    assert log.compact(10**9) == 28 and segments(tmp_path) == ["feedback-000000000098.jsonl"]  # never the active one
    assert log.append([ev(101), ev(70)]) == [(101, False), (70, True)]


def test_id_indexes_of_compacted_segments_merge_and_still_answer(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=0)
    for lo in range(0, 2000, 20):
        log.append([ev(i) for i in range(lo, lo + 20)])
        log.compact(len(log))
    indexes = sorted(tmp_path.glob("*.ids.npy"))
    assert len(log) == 2000 and log.first_offset >= 1960 and len(indexes) <= 16  # 99 sealed segments
    log.close()
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=0)  # after a restart too
    assert log.append([ev(i) for i in range(0, 2000, 37)]) == [(i, True) for i in range(0, 2000, 37)]
    for i in (0, 159, 160, 999, 1961):
        with pytest.raises(EventIdConflict, match=f"'id-{i}'"):
            log.append([ev(i, label="HassTurnOff")])
    assert len(log) == 2000


def test_marks_are_durable_and_reach_the_reader(tmp_path):
    log = FeedbackLog(tmp_path)
    fill(log, 0, 20)
    assert log.mark([3, 4, 5, 9], "holdout") == 4
    assert log.mark([4, 9, 10], "holdout") == 1  # marks are sets: marking twice is once
    assert log.mark(range(12, 15), "rejected") == 3
    with pytest.raises(ValueError, match="unknown mark"):
        log.mark([1], "held")
    with pytest.raises(ValueError, match="not all in the log"):
        log.mark([19, 20], "rejected")
    log.close()
    with open(tmp_path / "marks.jsonl", "ab") as f:
        f.write(b'{"mark": "rejected", "ran')  # a mark cut short: never confirmed
    flags = {e.offset: (e.holdout, e.rejected) for e in FeedbackLogReader(tmp_path).read_from(0)}
    assert [o for o, (h, _) in flags.items() if h] == [3, 4, 5, 9, 10]
    assert [o for o, (_, r) in flags.items() if r] == [12, 13, 14]
    log = FeedbackLog(tmp_path)
    assert [e.offset for e in log.read_from(0) if e.holdout or e.rejected] == [3, 4, 5, 9, 10, 12, 13, 14]
    assert log.mark([1], "rejected") == 1
    assert [e.offset for e in FeedbackLogReader(tmp_path).read_from(0) if e.rejected] == [1, 12, 13, 14]
    assert log.mark([15, 16], "deferred") == 2  # held back on the base check alone: a fine-tune learns it
    assert [(e.offset, e.rejected) for e in FeedbackLogReader(tmp_path).read_from(0) if e.deferred] == [(15, False), (16, False)]


FAILED_WRITES = """
    import errno, json, os, resource
    from pathlib import Path
    from online_learning.feedback_log import FeedbackEvent, FeedbackLog, LogWriteError
    d = Path({directory!r})
    def snap():
        return {{p.name: p.read_bytes() for p in sorted(d.iterdir())}}
    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
    big = lambda i: FeedbackEvent(f"big-{{i}}", "x" * 400, "HassTurnOn")
    out = {{}}
    log = FeedbackLog(d, segment_events=20)
    log.append([FeedbackEvent(f"id-{{i}}", f"text {{i}}", "L") for i in range(12)])
    before, size = snap(), log.active_path.stat().st_size
    limit(size + 1000)  # room for two of the eight 450-byte lines: a short write, then EFBIG
    try:
        log.append([big(i) for i in range(8)])
    except LogWriteError as err:
        out["append_errno"], out["append_msg"] = err.errno, str(err)
    out["append_same_bytes"], out["len_after_failure"] = snap() == before, len(log)
    try:
        log.mark([1, 2], "holdout")  # marks.jsonl is empty: any byte is over a limit of 0
        limit(0)
        log.mark([3], "holdout")
    except LogWriteError as err:
        out["mark_errno"] = err.errno
    limit(resource.RLIM_INFINITY)
    out["after_space_is_back"] = log.append([big(0), FeedbackEvent("id-12", "text 12", "L")])
    out["marks"] = [e.offset for e in log.read_from(0) if e.holdout]
    log.append([FeedbackEvent(f"id-{{i}}", f"text {{i}}", "L") for i in range(13, 20)])  # the segment is full
    before = snap()
    limit(300)  # the id index of the full segment needs ~600 bytes: sealing fails, nothing is written
    try:
        log.append([FeedbackEvent("late", "late", "L")])
    except LogWriteError as err:
        out["seal_errno"] = err.errno
    out["seal_same_files"] = snap() == before
    limit(resource.RLIM_INFINITY)
    out["after_seal_retry"] = log.append([FeedbackEvent("late", "late", "L"), FeedbackEvent("id-3", "text 3", "L")])
    log.close()
    again = FeedbackLog(d, segment_events=20)
    out["reopened"] = [len(again), [e.event_id for e in again.read_from(12, limit=2)], sorted(p.name for p in d.iterdir())]
    print(json.dumps(out))
"""


def test_a_failed_write_leaves_the_log_as_it_was_and_the_next_append_works(tmp_path):
    out = run_child(FAILED_WRITES.format(directory=str(tmp_path)))
    assert out["append_errno"] == errno.EFBIG and "EFBIG" in out["append_msg"], out
    assert out["append_same_bytes"] and out["len_after_failure"] == 12
    assert out["mark_errno"] == errno.EFBIG
    assert out["after_space_is_back"] == [[12, False], [13, False]]  # offsets go on from before the failure
    assert out["marks"] == [1, 2]
    assert out["seal_errno"] == errno.EFBIG and out["seal_same_files"]
    assert out["after_seal_retry"] == [[21, False], [3, True]]
    assert out["reopened"][0] == 22 and out["reopened"][1] == ["big-0", "id-12"]
    assert out["reopened"][2] == ["feedback-000000000000.ids.npy", "feedback-000000000000.jsonl",
                                  "feedback-000000000021.jsonl", "marks.jsonl", "owner.lock", "owner_epoch.json"]


def test_the_reader_never_writes_and_stops_before_a_write_in_flight(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10, retain_events=0)
    fill(log, 0, 40)
    log.mark([2, 33], "holdout")
    log.compact(15)
    active = log.active_path
    log.close()
    with open(active, "ab") as f:  # the learner's write in flight: a whole line of a 2-event batch
        f.write(json.dumps({"offset": 40, "event_id": "id-40", "text": "t", "label": "L", "ts": 1.0, "end": 41}).encode()
                + b"\n" + b'{"offset": 41, "eve')
    with open(tmp_path / "marks.jsonl", "ab") as f:
        f.write(b'{"mark": "holdout", "ranges": [[3')
    os.utime(tmp_path, ns=(1_000_000_000, 1_000_000_000))
    before, dir_mtime = files(tmp_path), tmp_path.stat().st_mtime_ns
    reader = FeedbackLogReader(tmp_path)
    events = reader.read_from(reader.first_offset)
    assert reader.first_offset == 14 and [e.offset for e in events] == list(range(14, 40)) and len(reader) == 40
    assert [e.offset for e in events if e.holdout] == [33]
    assert [e.offset for e in reader.iter_from(30, limit=3)] == [30, 31, 32]
    with pytest.raises(OffsetCompacted):
        reader.read_from(3)
    assert files(tmp_path) == before and tmp_path.stat().st_mtime_ns == dir_mtime
    missing = tmp_path / "nothing-here"
    assert FeedbackLogReader(missing).read_from(0) == [] and len(FeedbackLogReader(missing)) == 0
    assert not missing.exists()


WRITER = """
    import json, sys
    from online_learning.feedback_log import FeedbackEvent, FeedbackLog
    log = FeedbackLog({directory!r}, segment_events=300)
    n, batch = {n}, 7
    for lo in range(0, n, batch):
        log.append([FeedbackEvent(f"id-{{i}}", f"text {{i}} " + "w" * (i % 50), "L") for i in range(lo, min(n, lo + batch))])
    print(json.dumps({{"len": len(log)}}))
"""


def test_a_reader_process_sees_a_prefix_while_a_writer_process_appends(tmp_path):
    n = 21_000  # 3,000 batches of 7, 70 segments
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER.format(directory=str(tmp_path), n=n))],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, lengths, deadline = 0, set(), time.monotonic() + 120
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            reader = FeedbackLogReader(tmp_path)
            events = reader.read_from(0) if seen < 2000 else reader.read_from(seen - 700)  # from the middle too
            start = 0 if seen < 2000 else seen - 700
            offsets = [e.offset for e in events]
            assert offsets == list(range(start, start + len(events)))  # dense, no gap, no garbage
            assert all(e.event_id == f"id-{e.offset}" and e.text.startswith(f"text {e.offset} ") for e in events)
            total = start + len(events)
            assert total % 7 == 0 or total == n  # never part of a batch
            assert total >= seen  # a prefix that only grows
            seen = total
            lengths.add(total)
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err[-2000:]
    assert json.loads(out)["len"] == n
    assert len(lengths) >= 3, f"the reader never overlapped the writer: {sorted(lengths)}"
    final = FeedbackLogReader(tmp_path).read_from(0)
    assert [e.offset for e in final] == list(range(n))
    print(f"reader saw {len(lengths)} different lengths while the writer appended {n} events")


GROWTH = """
    import json, os, time
    import psutil
    from pathlib import Path
    from online_learning.feedback_log import FeedbackEvent, FeedbackLog
    d, total, batch, every = Path({directory!r}), {total}, 256, 20_000
    proc = psutil.Process()
    def disk():
        return sum(p.stat().st_size for p in d.iterdir())
    def anon():  # the heap, without the id indexes' memory-mapped file pages (the kernel can drop those)
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    log = FeedbackLog(d, segment_events=10_000, retain_events=20_000)
    figures, t0, appends, dup_checks = {{}}, time.perf_counter(), 0, 0
    max_disk = max_rss_after_warmup = max_anon_after_warmup = 0
    for lo in range(0, total, batch):
        evs = [FeedbackEvent(f"client-{{i:09d}}", f"turn on the light number {{i}} in room {{i % 97}}",
                             "HassTurnOn" if i % 3 else "HassTurnOff") for i in range(lo, min(total, lo + batch))]
        log.append(evs)
        appends += 1
        log.mark(range(lo, lo + len(evs), 20), "holdout")  # what the gate would hold out
        if (lo + batch) // every != lo // every:  # the learner snapshots and compacts every 20k
            old = [FeedbackEvent(f"client-{{i:09d}}", f"turn on the light number {{i}} in room {{i % 97}}",
                                 "HassTurnOn" if i % 3 else "HassTurnOff") for i in range(0, 256)]
            assert all(dup for _, dup in log.append(old)), "a resend of compacted events must stay duplicate"
            dup_checks += 1
            log.compact(len(log))
            max_disk = max(max_disk, disk())
            rss = proc.memory_info().rss
            if lo + batch > every:
                figures.setdefault("rss_after_first_20k", rss)
                figures.setdefault("anon_after_first_20k", anon())
                max_rss_after_warmup = max(max_rss_after_warmup, rss)
                max_anon_after_warmup = max(max_anon_after_warmup, anon())
    elapsed = time.perf_counter() - t0
    stats = log.stats()
    figures.update(events=len(log), seconds=round(elapsed, 2), appends=appends, appends_per_s=round(appends / elapsed),
                   events_per_s=round(len(log) / elapsed), rss_end=proc.memory_info().rss,
                   max_rss_after_warmup=max_rss_after_warmup, max_anon_after_warmup=max_anon_after_warmup,
                   max_disk=max_disk, disk_end=disk(),
                   segment_bytes_end=sum(p.stat().st_size for p in d.glob("*.jsonl") if p.name != "marks.jsonl"),
                   id_index_bytes=sum(p.stat().st_size for p in d.glob("*.ids.npy")), dup_checks=dup_checks, stats=stats)
    print(json.dumps(figures))
"""


def test_growth_200k_events_keeps_memory_and_disk_bounded(tmp_path):
    total = 200_000
    f = run_child(GROWTH.format(directory=str(tmp_path), total=total), timeout=300)
    mb = 1 << 20
    print(f"\n200k events, 256 per append, compaction every 20k (segment_events=10000, retain_events=20000): "
          f"{f['seconds']} s, {f['appends_per_s']} appends/s ({f['events_per_s']} events/s); "
          f"RSS {f['rss_after_first_20k'] / mb:.1f} MiB after 20k -> max {f['max_rss_after_warmup'] / mb:.1f} MiB, "
          f"end {f['rss_end'] / mb:.1f} MiB (heap, RssAnon: {f['anon_after_first_20k'] / mb:.1f} -> "
          f"max {f['max_anon_after_warmup'] / mb:.1f} MiB); disk max {f['max_disk'] / mb:.2f} MiB, end {f['disk_end'] / mb:.2f} MiB "
          f"(segments {f['segment_bytes_end'] / mb:.2f} MiB, id indexes {f['id_index_bytes'] / mb:.2f} MiB); {f['stats']}")
    assert f["events"] == total and f["dup_checks"] == 10
    assert f["stats"]["ids_in_memory"] <= 10_000 + 256 and f["stats"]["first_offset"] >= total - 20_000 - 20_000
    assert f["max_anon_after_warmup"] - f["anon_after_first_20k"] < 8 * mb  # not growing with history
    assert f["max_rss_after_warmup"] - f["rss_after_first_20k"] < 16 * mb
    assert f["stats"]["id_indexes"] <= 2 * 8  # merged: not one file per segment ever sealed
    line = 200  # bytes per logged event here: ~170
    assert f["segment_bytes_end"] < (20_000 + 2 * 10_000 + 256) * line  # retention + the active segment
    assert f["id_index_bytes"] <= total * 24 + 128 * 20 + 256 * 24  # 24 B per event ever logged
    assert f["max_disk"] < (20_000 + 2 * 10_000 + 256) * line + total * 24 + 1 * mb


def _lines(offsets, end):
    return [json.dumps({"offset": o, "event_id": f"new-{o}", "text": "t" * 300, "label": "L", "ts": 1.0,
                        "end": end}).encode() + b"\n" for o in offsets]


@pytest.mark.parametrize("shape", ["zeros_inside_the_batch", "zeros_only", "zeros_then_torn_line"])
def test_reopen_recovers_from_a_tail_a_power_loss_left_mid_write(tmp_path, shape):
    log = FeedbackLog(tmp_path, segment_events=10)
    fill(log, 0, 30)
    active = log.active_path
    log.close()
    good = active.read_bytes()
    # A power loss while a 20-event batch (offsets 30..49) was being written: the file kept its new
    # length but some of its pages never reached the disk and read back as zeros.
    batch = b"".join(_lines(range(30, 50), 49))
    if shape == "zeros_inside_the_batch":  # zeros, then complete lines of that batch, its end line too
        tail = batch[:100] + b"\0" * 4096 + batch[100 + 4096:]
        assert tail.endswith(b"\n") and b'"offset": 49' in tail[4196:]
    elif shape == "zeros_only":
        tail = b"\0" * 8192
    else:
        tail = batch[:500] + b"\0" * 4096 + b'{"offset": 4'
    active.write_bytes(good + tail)
    assert [e.offset for e in FeedbackLogReader(tmp_path).read_from(25)] == [25, 26, 27, 28, 29]
    again = FeedbackLog(tmp_path, segment_events=10)
    assert len(again) == 30 and active.read_bytes() == good
    assert again.append([ev(30), ev(29)]) == [(30, False), (29, True)]
    again.close()
    assert [e.offset for e in FeedbackLogReader(tmp_path).read_from(0)] == list(range(31))


def test_damaged_acknowledged_events_refuse_to_open_and_say_what_to_do(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=100)
    fill(log, 0, 30)
    log.append([FeedbackEvent(f"x-{i}", "t" * 300, "L") for i in range(30)])  # offsets 30..59, one batch
    fill(log, 60, 70)  # written only after that batch was fsynced and acknowledged
    active = log.active_path
    log.close()
    data = bytearray(active.read_bytes())
    start = data.index(b'"offset": 40,') - 1
    data[start:start + 4096] = b"\0" * 4096  # a bad page inside acknowledged events 40..~52
    active.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as err:
        FeedbackLog(tmp_path, segment_events=100)
    message = str(err.value)
    keep = len(b"".join(active.read_bytes().splitlines(keepends=True)[:30]))
    assert "acknowledged events from offset 30" in message and f"truncate -s {keep} " in message
    assert active.read_bytes() == bytes(data)  # nothing changed
    with pytest.raises(CorruptLog):
        FeedbackLogReader(tmp_path).read_from(0)


@pytest.mark.parametrize("known_by", ["a_mark", "the_state_file"])
def test_a_damaged_last_batch_that_was_marked_or_learned_refuses_to_open(tmp_path, known_by):
    """Damage inside the last batch looks like a write cut short, but when a mark or the learner's
    state names one of its offsets it was acknowledged: refuse, change nothing, reuse no offset."""
    from train.learner_state import LearnerState, write_state_file

    log = FeedbackLog(tmp_path, segment_events=100)
    fill(log, 0, 3)
    log.append([ev(i) for i in range(3, 8)])  # the last batch: offsets 3..7, acknowledged
    if known_by == "a_mark":
        log.mark([4, 5], "rejected")
    active = log.active_path
    log.close()
    if known_by == "the_state_file":
        write_state_file(tmp_path, LearnerState(version=2, log_offset=7, judged_offset=7))
    data = bytearray(active.read_bytes())
    at = data.index(b'"offset": 5,')
    data[at + 2] ^= 0x20  # one flipped byte: line 5 no longer parses
    active.write_bytes(bytes(data))
    with pytest.raises(CorruptLog, match="acknowledged events from offset 3"):
        FeedbackLog(tmp_path, segment_events=100)
    assert active.read_bytes() == bytes(data)  # nothing cut, so no offset can be handed out twice


def _big_mark(log, n):
    log.mark(range(0, n, 2), "holdout")  # every other offset: one line of n/2 ranges, several pages


def test_a_multi_page_mark_cut_by_a_power_loss_is_dropped_and_a_damaged_confirmed_one_refuses(tmp_path):
    log = FeedbackLog(tmp_path, segment_events=10_000)
    fill(log, 0, 3000, batch=500)
    log.mark([1], "rejected")
    marks = tmp_path / "marks.jsonl"
    confirmed = marks.read_bytes()
    _big_mark(log, 3000)
    line = marks.read_bytes()[len(confirmed):]
    assert len(line) > 3 * 4096
    log.close()
    # the line's first pages never reached the disk; its last page, with the newline, did
    marks.write_bytes(confirmed + b"\0" * 8192 + line[8192:])
    assert not any(e.holdout for e in FeedbackLogReader(tmp_path).read_from(0))
    again = FeedbackLog(tmp_path, segment_events=10_000)
    assert marks.read_bytes() == confirmed
    assert [e.offset for e in again.read_from(0) if e.rejected] == [1]
    _big_mark(again, 3000)  # the learner marks them again; confirmed this time
    again.mark([3], "rejected")
    again.close()
    assert sum(e.holdout for e in FeedbackLogReader(tmp_path).read_from(0)) == 1500
    # damage inside a confirmed mark with a later mark after it: refuse, say what to do
    data = bytearray(marks.read_bytes())
    data[len(confirmed) + 10:len(confirmed) + 10 + 4096] = b"\0" * 4096
    marks.write_bytes(bytes(data))
    with pytest.raises(CorruptLog, match=f"truncate -s {len(confirmed)} "):
        FeedbackLog(tmp_path, segment_events=10_000)
    assert marks.read_bytes() == bytes(data)
