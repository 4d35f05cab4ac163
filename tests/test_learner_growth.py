"""200k feedback events through the real learner (HTTP -> log -> rounds -> publishes -> snapshots):
its memory and the state folder stay bounded, the log is compacted, old snapshots are deleted.

Slow (minutes): run with TEXTSERVE_SLOW=1. The figures it prints are in docs/ONLINE_LEARNING.md.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, wait_until
from tests.test_online_learning import AUTH, learner_pid, learner_status
from train.store import ModelStore

EVENTS, BATCH = 200_000, 256


def folder_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@pytest.mark.slow
def test_200k_events_keep_the_learner_and_its_disk_bounded(ray_cluster, base_url, trained_store, tmp_path):
    from ray import serve

    root = tmp_path / "growth"
    store, state = str(root / "store"), str(root / "state")
    shutil.copytree(trained_store, store)
    # Rounds of up to 4096 new events, no feedback replay, so 200k events fit in minutes on 2 cores;
    # small log segments and retention so that compaction and snapshot retention happen many times.
    deploy_online(store, state, name="online", rate_limit_per_s=1000, rate_burst=1000, max_round_events=4096,
                  replay_events=0, replay_ratio=0, followup_rounds=0, base_replay_ratio=0.1,
                  log_segment_events=10_000, log_retain_events=20_000, snapshot_interval_s=5.0, store_keep_last=3)
    url = f"{base_url}/online"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="growth app")
        proc = psutil.Process(wait_until(learner_pid, timeout=60, what="learner pid"))
        rss, disk = [proc.memory_info().rss], [folder_bytes(state)]
        started = time.monotonic()
        with requests.Session() as session:
            for start in range(0, EVENTS, BATCH):
                # Consistent labels, so rounds pass the gate and publish (snapshots move the
                # compaction point; a stream the gate rejects throughout keeps its log, see the docs).
                body = [{"event_id": f"g-{i}", "text": f"turn {'on' if i % 2 else 'off'} the lamp number {i} in room "
                         f"{i % 97}", "label": "HassTurnOn" if i % 2 else "HassTurnOff"} for i in range(start, start + BATCH)]
                while (r := session.post(f"{url}/v1/feedback", json=body, headers=AUTH, timeout=30)).status_code in (429, 503):
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                assert r.status_code == 202, r.text
                if start % (20 * BATCH) == 0:
                    rss.append(proc.memory_info().rss)
                    disk.append(folder_bytes(state))
        sent_s = time.monotonic() - started
        wait_until(lambda: (s := learner_status(url)).get("pending") == 0 and s, timeout=900, interval=2,
                   what="every event trained")
        rss.append(proc.memory_info().rss)
        disk.append(folder_bytes(state))
        status = learner_status(url)
        versions = ModelStore(store).versions()
        print(f"\n200k events: sent in {sent_s:.0f} s, trained in {time.monotonic() - started:.0f} s; learner RSS "
              f"{rss[0] / 2**20:.0f} -> max {max(rss) / 2**20:.0f} -> end {rss[-1] / 2**20:.0f} MiB; state folder "
              f"max {max(disk) / 2**20:.1f} MiB, end {disk[-1] / 2**20:.1f} MiB; store versions {versions}; "
              f"log length {status['log_length']}, learner version {status['version']}")
        assert status["log_length"] >= EVENTS
        # Bounded: memory does not grow with the events (a few hundred MiB of TF/Ray, not per event),
        # the folder holds the retained segments + 24 B/event of id index, the store its retention.
        assert max(rss[len(rss) // 2:]) < rss[1] + 300 * 2**20, [r // 2**20 for r in rss]
        assert disk[-1] < 20 * 2**20, disk[-1]
        assert len(versions) <= 3 + 2, versions
    finally:
        serve.delete("online")
