"""Online learning end to end: real Ray + Serve, feedback over HTTP, served answers changing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time

import pytest
import requests

from bench.drift import served_accuracy  # English/Korean accuracy as served, over HTTP
from online_learning.feedback_log import FeedbackLogReader
from online_learning.send import send
from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, wait_until
from train.data import DataSpec, load_dataset

AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


@pytest.fixture(scope="module")
def online(ray_cluster, base_url, trained_store, tmp_path_factory):
    """An app whose base model knows English only, with its own store copy and feedback log."""
    from ray import serve

    root = tmp_path_factory.mktemp("online")
    store, state = str(root / "store"), str(root / "state")
    shutil.copytree(trained_store, store)
    for app in ("overload",):  # leave cores for this app's five processes
        serve.delete(app)
    deploy_online(store, state)
    url = f"{base_url}/online"
    wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="online app")
    yield {"url": url, "store": store, "state": state}
    serve.delete("online")


def learner_status(url) -> dict:
    """The learner's view through a replica; {"error": ...} while none answers (e.g. one replaced)."""
    try:
        body = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
    except (requests.RequestException, ValueError) as err:
        return {"error": repr(err)}
    return body.get("learner") or {"error": body}




def events_from(examples, prefix):
    return [{"event_id": f"{prefix}-{i}", "text": e.text, "label": e.label} for i, e in enumerate(examples)]


def test_feedback_auth_idempotency_and_bad_input(online):
    url = online["url"] + "/v1/feedback"
    event = {"event_id": "auth-1", "text": "turn on the porch light", "label": "HassTurnOn"}
    assert requests.post(url, json=event, timeout=10).status_code == 401
    r = requests.post(url, json=event, headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 403 and FEEDBACK_TOKEN not in r.text
    first = requests.post(url, json=event, headers=AUTH, timeout=10)
    assert first.status_code == 202 and first.json()["accepted"] == 1
    again = requests.post(url, json=event, headers=AUTH, timeout=10)
    assert again.status_code == 202 and again.json() == {"accepted": 0, "duplicates": 1,
                                                          "offsets": first.json()["offsets"]}
    length = learner_status(online["url"])["log_length"]
    bad = [
        ({**event, "event_id": "b1", "label": "NoSuchIntent"}, 422, "unknown_label"),
        ({**event, "event_id": "b2", "text": " "}, 422, "empty_text"),
        ({**event, "event_id": "b3", "text": "x" * 2001}, 413, "text_too_long"),
        ({"event_id": "b4", "text": "hi"}, 422, "invalid_type"),
        ([event] * 257, 413, "too_many_events"),
        ([], 422, "empty_events"),
        ([{**event, "event_id": "b5"}, {**event, "event_id": "b6", "label": "Nope"}], 422, "unknown_label"),
    ]
    for body, status, code in bad:
        r = requests.post(url, json=body, headers=AUTH, timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    r = requests.post(url, data=b"{not json", headers=AUTH, timeout=10)
    assert r.json()["error"]["code"] == "malformed_json"
    assert learner_status(online["url"])["log_length"] == length  # nothing written, not even b5


def test_conflicting_event_id_is_409_and_the_cli_loses_nothing(online, tmp_path, capsys):
    from online_learning.send import main as send_cli
    from tests._helpers import write_jsonl

    url = online["url"]
    first = {"event_id": "clash-1", "text": "turn on the porch light", "label": "HassTurnOn"}
    assert requests.post(f"{url}/v1/feedback", json=first, headers=AUTH, timeout=10).status_code == 202
    length = learner_status(url)["log_length"]
    other = {"event_id": "clash-2", "text": "stop the fan", "label": "HassTurnOff"}
    r = requests.post(f"{url}/v1/feedback", json=[other, {**first, "label": "HassTurnOff"}], headers=AUTH, timeout=10)
    assert r.status_code == 409 and r.json()["error"] == {**r.json()["error"], "code": "event_id_conflict",
                                                          "event_id": "clash-1"}
    assert learner_status(url)["log_length"] == length  # not even clash-2 was written
    twice = [{"event_id": "clash-3", "text": "open the garage", "label": "HassTurnOn"},
             {"event_id": "clash-3", "text": "close the garage", "label": "HassTurnOn"}]
    r = requests.post(f"{url}/v1/feedback", json=twice, headers=AUTH, timeout=10)
    assert r.status_code == 409 and "appears twice in this request" in r.json()["error"]["message"]
    assert learner_status(url)["log_length"] == length
    # Two files with the same name on two days: both learned (ids follow the content).
    for day, rows in (("day1", [{"text": "dim the hallway lamp please", "label": "HassLightSet"}]),
                      ("day2", [{"text": "switch the attic fan off", "label": "HassTurnOff"},
                                {"text": "dim the hallway lamp please", "label": "HassLightSet"}])):
        (tmp_path / day).mkdir()
        path = write_jsonl(tmp_path / day / "feedback.jsonl", rows)
        assert send_cli(["--url", url, "--token", FEEDBACK_TOKEN, "--file", str(path)]) == 0
    assert learner_status(url)["log_length"] == length + 2  # 1 + 1 new; day 2's repeat is a duplicate
    out = capsys.readouterr().out
    assert "accepted 1, duplicates 0" in out and "accepted 1, duplicates 1" in out
    # A file whose explicit id clashes: that event is refused (exit 1), its neighbour still sent.
    path = write_jsonl(tmp_path / "clash.jsonl", [{**first, "label": "HassTurnOff"},
                                                  {"event_id": "clash-3", "text": "open the blinds", "label": "HassTurnOn"}])
    assert send_cli(["--url", url, "--token", FEEDBACK_TOKEN, "--file", str(path)]) == 1
    assert "refused 1 (of them event_id conflicts: 1)" in capsys.readouterr().out
    assert learner_status(url)["log_length"] == length + 3


def test_rate_limit_answers_429_with_retry_after(online):
    url = online["url"] + "/v1/feedback"
    statuses, retry_after = [], None
    for i in range(400):  # 20/s, burst 30 for the app: some of 400 quick requests are limited
        r = requests.post(url, json={"event_id": "rl", "text": "stop the fan", "label": "HassTurnOff"},
                          headers=AUTH, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after = r.headers.get("Retry-After")
            break
    assert 429 in statuses and retry_after and int(retry_after) >= 1


def test_drift_korean_feedback_is_learned_and_served(online):
    url = online["url"]
    ko = load_dataset(DataSpec(langs=("ko",)))
    en_splits = load_dataset(DataSpec(langs=("en",)))
    en, en_val = en_splits.test, en_splits.validation  # validation: the gate's base holdout; test: no decision sees it
    before, _ = served_accuracy(url, ko.test)
    en_before, _ = served_accuracy(url, en)
    en_val_before, _ = served_accuracy(url, en_val)
    assert before < 0.35, f"an English-only model should be near chance on Korean, got {before}"
    summary = send(url, events_from(ko.train, "ko"), FEEDBACK_TOKEN, batch=128, progress=False)
    last_ack = time.monotonic()
    assert summary["accepted"] == len(ko.train) and summary["failed"] == 0

    def learned():
        acc, versions = served_accuracy(url, ko.test)
        return acc >= 0.8 and (acc, versions)

    try:
        acc, versions = wait_until(learned, timeout=240, interval=1.0, what="served Korean accuracy >= 0.8")
    except TimeoutError:  # say why: the learner's rounds, published or held back and why
        print(json.dumps(learner_status(url).get("history", [])[-15:], indent=0))
        raise
    took = time.monotonic() - last_ack
    print(f"\nKorean test accuracy served: {before:.3f} -> {acc:.3f}, {took:.1f} s after the last ack; versions {versions}")
    assert min(versions) > 1  # every answer names its version; all came from learned versions

    # No forgetting (issue 13): once the learner is done with the stream (its follow-up rounds
    # too) and every replica serves its final version, English served on the gate's holdout (the
    # whole validation split) is within max_base_drop (1 point) of the lineage's first version;
    # the earlier tests' few English events may have moved what "before" measured by a fraction
    # of a point, hence the half point more. On the test split, which no decision sees, versions
    # differ by up to ~2 points run to run (docs/ONLINE_LEARNING.md, drift runs): checked for
    # no collapse only; docs/DRIFT.md reports the measured figure.
    offset = learner_status(url)["log_length"] - 1
    final = wait_until(lambda: learner_settled(url, offset), timeout=120, what="replicas on the final version")
    en_after, _ = served_accuracy(url, en)
    en_val_after, _ = served_accuracy(url, en_val)
    ko_after, _ = served_accuracy(url, ko.test)
    print(f"final v{final['version']}: English test {en_before:.4f} -> {en_after:.4f}, validation "
          f"{en_val_before:.4f} -> {en_val_after:.4f}, Korean {ko_after:.4f}")
    assert en_val_after >= en_val_before - 0.015, f"English forgotten: validation {en_val_before:.4f} -> {en_val_after:.4f}"
    assert en_after >= en_before - 0.03, f"English forgotten: test {en_before:.4f} -> {en_after:.4f}"
    assert ko_after >= 0.8, ko_after


def learner_settled(url, offset: int) -> dict | None:
    """The learner's status once it has applied everything up to `offset`, has no follow-up
    rounds left (publishes nothing more) and every live replica holds its final version."""
    s = replicas_converged(url)
    return s if s and s["applied_offset"] >= offset and s["followups_left"] == 0 and not s["pending"] else None


def test_staleness_bound_holds_on_every_replica(online):
    from ray import serve

    url = online["url"]
    max_staleness = learner_status(url)["max_staleness_s"]
    for i in range(3):
        r = requests.post(f"{url}/v1/feedback", headers=AUTH, timeout=10,
                          json={"event_id": f"stale-{i}", "text": f"turn on the lamp number {i}", "label": "HassTurnOn"})
        acked_at, offset = time.monotonic(), r.json()["offsets"][0]
        replicas = serve.status().applications["online"].deployments["Classifier"].replica_states["RUNNING"]

        def all_replicas_serve_it():
            live = learner_status(url)["replicas"]
            return len(live) == replicas and all(rep["log_offset"] >= offset for rep in live.values())

        wait_until(all_replicas_serve_it, timeout=max_staleness + 30, interval=0.1, what=f"offset {offset} served")
        lag = time.monotonic() - acked_at
        assert lag <= max_staleness, f"event {offset} reached every replica after {lag:.2f} s"


def test_poisoned_stream_is_refused(online):
    """600 English training sentences relabelled at random: refused by the contradiction check
    before training (not merely absorbed by rehearsal), out of what is replayed and fine-tuned on,
    and what the replicas answer barely moves."""
    url = online["url"]
    en = load_dataset(DataSpec(langs=("en",)))
    status = learner_status(url)
    refused_before = status["refused"]
    base_acc, _ = served_accuracy(url, en.test)
    rng = random.Random(7)
    labels = sorted({e.label for e in en.train})
    poison = [{"event_id": f"poison-{i}", "text": e.text, "label": rng.choice(labels)}
              for i, e in enumerate(rng.sample(en.train, 600))]
    assert send(url, poison, FEEDBACK_TOKEN, batch=256, progress=False)["failed"] == 0
    offset = learner_status(url)["log_length"] - 1
    wait_until(lambda: (s := learner_status(url))["applied_offset"] >= offset and s["pending"] == 0,
               timeout=120, what="poison processed")
    status = learner_status(url)
    print(json.dumps(status["history"][-8:], indent=0))
    reasons = [h.get("refused_reason", "") for h in status["history"] if h.get("refused")]
    assert status["refused"] - refused_before >= len(poison) * 0.8 and reasons[-1].startswith("contradicts")
    after_acc, _ = served_accuracy(url, en.test)
    # The outcome: what the replicas answer on English held-out sentences barely moved (the gate
    # allows 1 point against the lineage's anchor on its own base holdout; 2 here for sampling).
    assert after_acc >= base_acc - 0.02, f"served English accuracy {base_acc:.3f} -> {after_acc:.3f}"
    # ...and the poison is out of what later rounds replay and a fine-tune reads: marked in the log.
    reader = FeedbackLogReader(online["state"])
    logged = [e for e in reader.read_from(offset - len(poison) + 1) if e.event_id.startswith("poison-")]
    assert len(logged) == len(poison)
    accepted = [e.event_id for e in logged if not (e.rejected or e.holdout)]
    assert len(accepted) <= len(poison) // 10, f"{len(accepted)} poison events accepted, e.g. {accepted[:3]}"
    # The sentences it refused are still answered as the base answered them.
    probe = [e for e in en.train if e.text in {p["text"] for p in poison[:64]}][:64]
    assert served_accuracy(url, probe)[0] >= 0.9


def learner_pid(app: str = "online") -> int | None:
    """The live learner's PID; None while it is down or being replaced."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:OnlineLearner"), ("state", "=", "ALIVE")])
    return actors[0].pid if len(actors) == 1 else None


def test_kill_9_learner_mid_stream_loses_nothing_and_applies_once(online):
    url = online["url"]
    en = load_dataset(DataSpec(langs=("en",)))
    events = events_from(en.train[:1200], "kill")
    old_pid = learner_pid()
    assert old_pid
    before_kill = learner_status(url)
    predictions: list[int] = []
    resets: list[float] = []
    stop = threading.Event()

    def keep_predicting():
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                predictions.append(requests.post(f"{url}/v1/predict", json={"text": "pause the music"}, timeout=30).status_code)
            except requests.ConnectionError:  # Serve's HAProxy reloading its config: retry, as clients do
                resets.append(time.monotonic())

    reader = threading.Thread(target=keep_predicting, daemon=True)
    reader.start()
    result = {}
    sender = threading.Thread(target=lambda: result.update(send(url, events, FEEDBACK_TOKEN, batch=40, progress=False)))
    sender.start()
    wait_until(lambda: learner_status(url)["log_length"] > 0 and any(
        e["event_id"].startswith("kill-") for e in _log_tail(online["state"])), timeout=60, what="stream started")
    os.kill(old_pid, signal.SIGKILL)
    sender.join(timeout=300)
    assert result and result["failed"] == 0 and result["accepted"] + result["duplicates"] == len(events)
    wait_until(lambda: learner_pid() not in (None, old_pid), timeout=120, what="learner restarted")

    def settled():
        s = learner_status(url)
        return "error" not in s and s["pending"] == 0 and s["applied_offset"] == s["log_length"] - 1 and s
    status = wait_until(settled, timeout=180, what="every logged event applied")
    stop.set()
    reader.join(timeout=60)
    logged = FeedbackLogReader(online["state"]).read_from(0)
    ids = [e.event_id for e in logged]
    assert len(ids) == len(set(ids))  # idempotent: retries after the kill wrote nothing twice
    assert {f"kill-{i}" for i in range(len(events))} <= set(ids)  # every acknowledged event is there
    assert [e.offset for e in logged] == list(range(len(logged)))
    converged = wait_until(lambda: replicas_converged(url), timeout=60, what="replicas on the learner's weights")
    assert converged["replaying"] is False and converged["lineage"] != before_kill["lineage"]  # a new lineage
    assert converged["version"] > before_kill["version"]  # numbered above everything before the kill
    assert predictions and set(predictions) == {200}, set(predictions)
    assert len(resets) <= 2, f"{len(resets)} connection resets in {len(predictions)} predictions"
    print(f"\n{len(predictions)} predictions during the kill, all 200; {len(resets)} connection reset(s), retried")


def replicas_converged(url) -> dict | None:
    """The learner's status once every live replica reports exactly its (lineage, version,
    digest): digests each replica computed from the weights it holds, not copied names."""
    s = learner_status(url)
    live = [r for r in s.get("replicas", {}).values() if time.time() - r["reported_at"] < 5]
    want = (s.get("lineage"), s.get("version"), s.get("digest"))
    ok = s.get("digest") and len(live) >= 2 and all((r["lineage"], r["version"], r["digest"]) == want for r in live)
    return s if ok else None


def _log_tail(state_dir: str) -> list[dict]:
    reader = FeedbackLogReader(state_dir)
    return [{"event_id": e.event_id} for e in reader.read_from(max(reader.first_offset, len(reader) - 5))]


def test_fine_tune_while_feedback_streams_loses_nothing_and_the_learner_rebases(online):
    """A fine-tune (another process, reading the live log) while feedback keeps arriving: every
    acknowledged event is in the log once, the learner adopts the fine-tune and replays what
    came after it, every replica converges on its weights, and the store keeps its retention."""
    from train.job import TrainConfig, run_training
    from train.store import ModelStore

    url = online["url"]
    before = learner_status(url)
    en = load_dataset(DataSpec(langs=("en",)))
    stream = events_from(en.train[2000:2600], "during-ft")
    sent = {}

    def feed():  # small batches, spread over the fine-tune
        for start in range(0, len(stream), 20):
            result = send(url, stream[start : start + 20], FEEDBACK_TOKEN, batch=20, progress=False)
            sent["failed"] = sent.get("failed", 0) + result["failed"]
            sent["batches"] = sent.get("batches", 0) + 1
            time.sleep(0.3)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    cfg = TrainConfig(size="small", data=DataSpec(langs=("en",)), epochs=2, fine_tune=True, cpus_per_worker=0.25,
                      store_uri=online["store"], feedback_dir=online["state"], storage_path=online["state"] + "/runs")
    outcome = run_training(cfg)
    feeder.join(timeout=120)
    assert not feeder.is_alive() and sent["batches"] == len(stream) // 20 and sent["failed"] == 0
    assert outcome.version > before["version"]  # above every version the learner published
    metrics = ModelStore(online["store"]).metrics(outcome.version)
    # it read at least what the learner had judged before it began (never past what it had judged)
    assert metrics["kind"] == "fine-tune" and metrics["log_offset"] >= before["judged_offset"]

    def rebased():
        s = replicas_converged(url)
        return s and s["base_version"] == outcome.version and s["pending"] == 0 and s
    status = wait_until(rebased, timeout=120, what="learner rebased and replicas on the new base")
    assert status["version"] > outcome.version
    logged = FeedbackLogReader(online["state"]).read_from(FeedbackLogReader(online["state"]).first_offset)
    ids = [e.event_id for e in logged]
    assert len(ids) == len(set(ids)) and {e["event_id"] for e in stream} <= set(ids)  # none lost, none twice
    ko = load_dataset(DataSpec(langs=("ko",)))
    acc, versions = served_accuracy(url, ko.test)
    assert acc >= 0.8, acc  # the fine-tune trained on the Korean feedback in the log
    assert min(versions) > outcome.version
    # Snapshots every 3 s here; each is followed by retention: the newest 5 plus the bases the
    # learner stood on when it ran (the lineage before the fine-tune's, the fine-tune). Whatever
    # else older than the newest 5 is a leak. Polled: between a snapshot's write and its gc there
    # are more (the suite sampled 7 once: the old newest 5, the fine-tune, the first snapshot after).
    bases, seen = {before["base_version"], outcome.version}, {}

    def retained():
        seen["kept"] = kept = ModelStore(online["store"]).versions()
        return set(kept[:-5]) <= bases
    try:
        wait_until(retained, timeout=60, what=f"store retention: the newest 5 plus the bases {bases}")
    except TimeoutError as err:
        raise AssertionError(f"{err}; the store holds {seen['kept']}") from None
