"""A learner restart replays what was judged and judges what was not: the real learner class in a
fresh process (as after a crash), on a real model store, feedback log and state file, with its
own local Ray instance for the object store its publishes go to (never the test session's). The
same for ownership: a second learner on one state_dir stands by, and a superseded one stops."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from online_learning.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogReader
from train.data import DataSpec, load_dataset


_LEARNER_RUN = r"""
import asyncio, json, sys, time
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own, for ray.put
from online_learning.learner import OnlineLearner
from train.model import accuracy

for job in json.loads(sys.argv[1]):  # one learner after another, each started afresh on its own state
    store, state, last, probe = job["store"], job["state"], job["last"], job["probe"]
    learner = OnlineLearner.func_or_class(store, {"state_dir": state, "publish_interval_s": 0.2,
                                                  "snapshot_interval_s": 3600.0})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = asyncio.run(learner.status()).as_json()
        if (not status["replaying"] and status["applied_offset"] >= last and status["pending"] == 0
                and status["followups_left"] == 0):
            break
        time.sleep(0.5)
    else:
        sys.exit(f"learner on {state} not idle within 180 s: {json.dumps(status)[:2000]}")
    learner._stop.set()
    learner._thread.join(timeout=60)
    learner.__del__()  # as Serve stopping it: the log closed and the lease released
    status["probe_accuracy"] = accuracy(learner.served, probe["texts"], probe["labels"]) if probe["texts"] else None
    print("STATUS " + json.dumps(status), flush=True)
ray.shutdown()
"""


def _restart_learners(jobs: list[tuple]) -> list[dict]:
    """For each (store, state, last offset, probe examples): a learner started afresh on `state`
    (as after a crash: a new learner object, its own local Ray; the jobs share one such process,
    one after another, so module-level caches carry over between them, as they would not after
    a real crash), run until it has been through the log and is idle; its status, and its
    published model's accuracy on the probe."""
    import os
    import subprocess
    import sys

    arg = json.dumps([{"store": str(store), "state": str(state), "last": last,
                       "probe": {"texts": [e.text for e in probe], "labels": [e.label for e in probe]}}
                      for store, state, last, probe in jobs])
    out = subprocess.run([sys.executable, "-c", _LEARNER_RUN, arg], capture_output=True, text=True,
                         timeout=200 * len(jobs) + 120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in out.stdout.splitlines() if line.startswith("STATUS ")]
    assert out.returncode == 0 and len(lines) == len(jobs), out.stderr[-3000:]
    return [json.loads(line[len("STATUS "):]) for line in lines]


@pytest.fixture(scope="module")
def restarted(trained_store, tmp_path_factory) -> dict:
    """Both restart scenarios below, prepared on disk and run by one learner process."""
    en = load_dataset(DataSpec(langs=("en",)))
    root = tmp_path_factory.mktemp("restarts")
    jobs, names = [], []
    for name, prepare in (("unjudged", _prepare_unjudged), ("judged", _prepare_judged)):
        store, state = root / name / "store", root / name / "state"
        shutil.copytree(trained_store, store)  # the learner may write snapshots into it
        last, probe, extra = prepare(en, state)
        jobs.append((store, state, last, probe))
        names.append((name, state, extra))
    statuses = _restart_learners(jobs)
    return {name: {"status": status, "state": state, **extra}
            for (name, state, extra), status in zip(names, statuses)}


def _prepare_unjudged(en, state) -> tuple[int, list, dict]:
    rng = random.Random(11)
    labels = sorted({e.label for e in en.train})
    originals = rng.sample(en.train[100:], 600)
    log = FeedbackLog(state)
    log.append([FeedbackEvent(f"good-{i}", e.text, e.label) for i, e in enumerate(en.train[:100])])
    log.append([FeedbackEvent(f"poison-{i}", e.text, rng.choice(labels)) for i, e in enumerate(originals)])
    log.close()
    (state / "learner_state.json").write_text(json.dumps({"version": 7, "holdout_salt": "s", "lineage": "old",
                                                          "log_offset": 99, "judged_offset": 99}))
    return 699, originals[:64], {}


def test_events_acknowledged_but_never_judged_are_judged_after_a_restart(restarted):
    """100 good events a round had judged (the state file says so), then 600 English training
    sentences relabelled at random, acknowledged (in the log) by a learner that died before any
    round judged them: the restarted learner replays the 100 into its new lineage, and judges the
    600 as new feedback instead of replaying them unchecked (the contradiction check refuses them)."""
    status, state = restarted["unjudged"]["status"], restarted["unjudged"]["state"]
    print(json.dumps(status["history"][-5:], indent=0))
    assert status["replayed_on_start"] == 100, "judged events replayed, unjudged ones not"
    assert status["refused"] >= 480, status["refused"]
    rejected = [e for e in FeedbackLogReader(state).read_from(100) if e.rejected]
    assert len(rejected) >= 480
    served = status["probe_accuracy"]
    assert served >= 0.9, f"the published model answers the poisoned sentences' true labels {served:.2f}"
    saved = json.loads((state / "learner_state.json").read_text())
    assert saved["judged_offset"] == 699  # durable: the next restart replays them, judged once
    assert saved["version"] >= status["version"] > 7  # numbers never go back


def _prepare_judged(en, state) -> tuple[int, list, dict]:
    log = FeedbackLog(state)
    log.append([FeedbackEvent(f"good-{i}", e.text, e.label) for i, e in enumerate(en.train[:100])])
    log.close()
    (state / "learner_state.json").write_text(json.dumps({"version": 1, "holdout_salt": "s", "lineage": "old",
                                                          "log_offset": 99, "judged_offset": 99}))
    return 99, [], {}


def test_events_judged_before_a_restart_are_replayed_not_judged_again(restarted):
    """The other side: events a round had judged (the state file says so) are replayed into the
    new lineage at start, without the check, before it publishes."""
    status = restarted["judged"]["status"]
    assert status["replayed_on_start"] == 100 and status["refused"] == 0
    assert status["version"] > 1 and status["served_offset"] == 99


_LEARNER_OVERLAP = r"""
import asyncio, json, sys, time
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own, for ray.put
from online_learning.learner import OnlineLearner
from online_learning.protocol import Accepted, FeedbackEvent, NotOwnerAnswer, ReplicaIdentity

store, state, name, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
loop = asyncio.new_event_loop()
call = loop.run_until_complete
probe = ReplicaIdentity(None, 0, None, -1)  # a replica holding nothing yet
import train.model  # Keras and TensorFlow loaded while waiting
sys.stdin.readline()  # the test says when to start the learner
learner = OnlineLearner.func_or_class(store, {"state_dir": state, "publish_interval_s": 0.2,
                                              "snapshot_interval_s": 3600.0})
say = lambda tag, **fields: print(tag + " " + json.dumps(fields), flush=True)
k, shown = 0, None
while k < total:  # a client sending one event every 0.1 s, retrying each until it is accepted
    event = FeedbackEvent(f"{name}-{k}", f"turn on the light number {k}", "HassTurnOn")
    reply = call(learner.submit([event]))
    if isinstance(reply, Accepted):
        say("ACK", id=event.event_id, offset=reply.results[0][0], duplicate=reply.results[0][1])
        k += 1
    elif isinstance(reply, NotOwnerAnswer):
        update, status = call(learner.updates_since(name, probe)), call(learner.status()).as_json()
        say("STANDBY", epoch=reply.epoch, message=reply.message, kind=update.kind, learner_epoch=update.learner.epoch,
            learner_owner=update.learner.owner, standby=status.get("standby"))
    else:
        say("OTHER", reply=repr(reply))
    pub = learner.pub
    if pub is not None and (pub.version, pub.digest) != shown:
        shown = (pub.version, pub.digest)
        say("PUB", version=pub.version, digest=pub.digest)
    time.sleep(0.1)
while learner.pub is None or learner.pub.log_offset < reply.results[0][0]:  # its 20 events published
    time.sleep(0.1)
update = call(learner.updates_since(name, probe))
say("PUB", version=learner.pub.version, digest=learner.pub.digest)
say("DONE", kind=update.kind, learner_epoch=update.learner.epoch,
    update_epoch=ray.get(update.refs[0]).epoch if update.refs else None,
    status_epoch=call(learner.status()).as_json()["epoch"])
sys.stdin.readline()  # held until the test kills it
"""


def test_two_learners_overlapping_for_30s_one_owns_and_the_other_takes_over_losing_nothing(trained_store, tmp_path):
    """Two real learners (each in its own process with its own local Ray) on one state_dir for
    over 30 s, as when Serve or a KubeRay upgrade runs a replacement beside the old one, each
    sent a new event every 0.1 s by its client. The first owns the log and trains and publishes
    throughout; the second stands by (not_owner with the owner's epoch, "wait" to replicas,
    epoch 0) without blocking. When the first is killed (SIGKILL) the second takes over under
    epoch 2. Outcomes on disk: every acknowledged event is in the log exactly once, the log
    reopens, no version number names two digests, and the second's numbers and updates carry
    its epoch and go above the first's."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from online_learning.persistence import read_epoch
    from train.learner_state import read_state

    store, state = tmp_path / "store", tmp_path / "state"
    shutil.copytree(trained_store, store)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines: dict[str, list] = {"first": [], "second": []}
    procs: dict[str, subprocess.Popen] = {}

    def start(name, total):
        with open(tmp_path / f"{name}.err", "w") as err:  # a file, not a pipe nobody drains while waiting
            proc = subprocess.Popen([sys.executable, "-c", _LEARNER_OVERLAP, str(store), str(state), name, str(total)],
                                    cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        procs[name] = proc

        def read():  # complete lines only: a SIGKILL may cut the last one
            for out in proc.stdout:
                if out.endswith("\n"):
                    kind, _, fields = out.partition(" ")
                    lines[name].append((time.monotonic(), kind, json.loads(fields)))
        threading.Thread(target=read, daemon=True).start()

    def wait_for(name, kind, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := [line for line in lines[name] if line[1] == kind]:
                return found[0]
            if procs[name].poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {kind} from {name}: {lines[name][-5:]}; stderr: "
                             f"{(tmp_path / f'{name}.err').read_text()[-3000:]}")

    def go(name):
        procs[name].stdin.write("go\n")
        procs[name].stdin.flush()

    try:
        start("first", 1_000_000)  # until killed
        start("second", 20)  # its Ray and imports start beside the first's; its learner waits
        go("first")
        wait_for("first", "ACK")
        go("second")
        overlap_from = wait_for("second", "STANDBY")[0]  # its constructor returned while the first owns the log
        while time.monotonic() - overlap_from < 30:
            assert procs["first"].poll() is None and procs["second"].poll() is None, "a learner exited"
            time.sleep(0.5)
        os.kill(procs["first"].pid, signal.SIGKILL)
        procs["first"].wait(timeout=60)
        killed_at = time.monotonic()
        done = wait_for("second", "DONE")[2]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
    first, second = ({kind: [f for _, k, f in lines[name] if k == kind] for kind in ("ACK", "STANDBY", "PUB", "OTHER")}
                     for name in ("first", "second"))
    during = [f for t, k, f in lines["first"] if k == "ACK" and overlap_from <= t <= killed_at]
    assert len(during) >= 100, f"the owner kept accepting while the standby waited: {len(during)}"
    assert len({f["version"] for f in first["PUB"]}) >= 2, "the owner kept training and publishing"
    assert len(second["STANDBY"]) >= 50 and all(
        f["epoch"] == 1 and "standing by" in f["message"] and f["kind"] == "wait" and f["learner_epoch"] == 0
        and f["learner_owner"] is False and f["standby"] is True for f in second["STANDBY"]), second["STANDBY"][:3]
    assert first["OTHER"] == [] and second["OTHER"] == []
    assert len(second["ACK"]) == 20 and done["learner_epoch"] == done["update_epoch"] == done["status_epoch"] == 2
    digests: dict[int, set] = {}
    for f in first["PUB"] + second["PUB"]:
        digests.setdefault(f["version"], set()).add(f["digest"])
    assert all(len(d) == 1 for d in digests.values()), {v: d for v, d in digests.items() if len(d) > 1}
    assert min(f["version"] for f in second["PUB"]) > max(f["version"] for f in first["PUB"])
    assert read_epoch(state) == 2 and read_state(state).epoch == 2
    reopened = FeedbackLog(state)  # the log reopens for writing, as the next owner would open it
    length = len(reopened)
    reopened.close()
    ids = [e.event_id for e in FeedbackLogReader(state).read_from(0)]
    assert len(ids) == len(set(ids)) == length, "an event twice in the log"
    missing = set(f["id"] for f in first["ACK"] + second["ACK"]) - set(ids)
    assert not missing, f"acknowledged events missing from the log: {sorted(missing)[:5]}"
    assert not any(f["duplicate"] for f in first["ACK"] + second["ACK"])


_LEARNER_FENCED = r"""
import asyncio, json, sys, time
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own, for ray.put
from dataclasses import asdict
from online_learning.learner import OnlineLearner
from online_learning.protocol import FeedbackEvent

store, state = sys.argv[1], sys.argv[2]
loop = asyncio.new_event_loop()
call = loop.run_until_complete
learner = OnlineLearner.func_or_class(store, {"state_dir": state, "publish_interval_s": 0.2,
                                              "snapshot_interval_s": 3600.0})
events = lambda tag: [FeedbackEvent(f"{tag}-{i}", f"turn on the lamp {i}", "HassTurnOn") for i in range(3)]
plain = lambda reply: {type(reply).__name__: asdict(reply)}
print("FIRST " + json.dumps(plain(call(learner.submit(events("before"))))), flush=True)
sys.stdin.readline()  # the test raises the epoch on disk, as another host's learner would
reply = call(learner.submit(events("after")))
deadline = time.monotonic() + 60
while learner._thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    call(learner.check_health())
    health = "healthy"
except RuntimeError as err:
    health = str(err)
print("AFTER " + json.dumps({"submit": plain(reply), "thread_alive": learner._thread.is_alive(), "health": health}), flush=True)
"""


def test_a_learner_whose_epoch_was_superseded_refuses_feedback_writes_nothing_and_fails_its_health_check(
        trained_store, tmp_path):
    """The lock is not always enough (a filesystem that does not honour it): another learner
    raised the epoch. The running learner's next submit is refused with not_owner (nothing
    written), its training thread stops, and its health check fails so Serve replaces it."""
    import subprocess
    import sys

    from online_learning.persistence import EPOCH_FILE

    store, state = tmp_path / "store", tmp_path / "state"
    shutil.copytree(trained_store, store)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _LEARNER_FENCED, str(store), str(state)], cwd=root,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("FIRST "), (tmp_path / "err").read_text()[-3000:]
        assert json.loads(first[6:]) == {"Accepted": {"results": [[0, False], [1, False], [2, False]]}}
        (state / EPOCH_FILE).write_text(json.dumps({"epoch": 2, "pid": 0, "host": "elsewhere"}))
        segments = {p.name: p.read_bytes() for p in state.glob("feedback-*")}
        proc.stdin.write("go\n")
        proc.stdin.flush()
        after = proc.stdout.readline()
        assert after.startswith("AFTER "), (tmp_path / "err").read_text()[-3000:]
        out = json.loads(after[6:])
    finally:
        proc.kill()
        proc.wait(timeout=60)
    refused = out["submit"]["NotOwnerAnswer"]
    assert refused["epoch"] == 2 and "no longer owns" in refused["message"]
    assert out["thread_alive"] is False and "no longer owns" in out["health"]
    assert {p.name: p.read_bytes() for p in state.glob("feedback-*")} == segments
    assert [e.event_id for e in FeedbackLogReader(state).read_from(0)] == ["before-0", "before-1", "before-2"]
