"""Lifecycle: a version names exactly one set of weights through retrains and restarts.

One app of its own (2 Classifier replicas + learner, snapshots rare so that restarts must replay
the log). Every check reads what the replicas themselves report: the digest each replica
computes from the weights it holds, the answers it gives.
"""

from __future__ import annotations

import shutil
import time

import pytest
import requests

from online_learning.send import send
from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, trained_dir, wait_until
from tests.test_online_learning import AUTH, events_from, learner_status, replicas_converged, served_accuracy
from train.data import DataSpec, load_dataset

APP = "life"
LEARNER = {"snapshot_interval_s": 600.0, "max_staleness_s": 5.0}


class Identities:
    """Every (version -> digest) pair any replica or the learner reported during the module."""

    def __init__(self):
        self.seen: dict[int, set[str]] = {}

    def record(self, url: str, polls: int = 6) -> dict:
        info = {}
        for _ in range(polls):  # each request lands on one replica; several reach both
            body = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
            if body.get("weights_digest") and body.get("model_version"):
                self.seen.setdefault(body["model_version"], set()).add(body["weights_digest"])
                info[body["replica"]] = body
            learner = body.get("learner") or {}
            for r in (learner.get("replicas") or {}).values():
                self.seen.setdefault(r["version"], set()).add(r["digest"])
            for h in learner.get("history") or []:
                if h.get("published") and h.get("digest"):
                    self.seen.setdefault(h["version"], set()).add(h["digest"])
        return info

    def assert_one_digest_per_number(self):
        clashes = {v: d for v, d in self.seen.items() if len(d) > 1}
        assert not clashes, f"version numbers naming two sets of weights: {clashes}"


@pytest.fixture(scope="module")
def life(ray_cluster, base_url, trained_store, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("life")
    store, state = str(root / "store"), str(root / "state")
    shutil.copytree(trained_store, store)
    deploy_online(store, state, name=APP, **LEARNER)
    url = f"{base_url}/{APP}"
    wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="lifecycle app")
    ids = Identities()
    yield {"url": url, "store": store, "state": state, "ids": ids, "trained": trained_store}
    serve.delete(APP)
    ids.assert_one_digest_per_number()


class FeedbackProbe:
    """Posts one feedback event every 0.2 s and records how long each 202 took; on leaving it
    waits until at least `min_posts` were answered, so a window that closes fast still measures."""

    def __init__(self, url: str, min_posts: int = 5):
        import threading

        self.url, self.latencies, self.statuses, self.min_posts = url, [], [], min_posts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self._stop.wait(0.2) and i < 1500:
            started = time.monotonic()
            r = requests.post(f"{self.url}/v1/feedback", headers=AUTH, timeout=10,
                              json={"event_id": f"probe-{time.time_ns()}", "text": f"turn on lamp {i}", "label": "HassTurnOn"})
            self.statuses.append(r.status_code)
            if r.status_code == 202:
                self.latencies.append(time.monotonic() - started)
            i += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            wait_until(lambda: len(self.statuses) >= self.min_posts, timeout=30, what="feedback probe posts")
        self._stop.set()
        self._thread.join(timeout=15)


def learned(url, examples, at_least=0.8):
    acc, versions = served_accuracy(url, examples)
    return acc >= at_least and (acc, versions)


def converge(life, what: str, timeout: float = 120) -> dict:
    status = wait_until(lambda: replicas_converged(life["url"]), timeout=timeout, what=what)
    life["ids"].record(life["url"])
    return status


def test_learned_feedback_survives_a_full_stop_and_is_served_before_ready(life):
    """Stop the whole app (snapshots off: what was learned lives only in the log) and start it
    on the same store and state: from the first /healthz 200 on, the learned sentences answer
    as learned, under a version above every earlier one."""
    from ray import serve

    url = life["url"]
    ko = load_dataset(DataSpec(langs=("ko",)))
    assert send(url, events_from(ko.train, "life-ko"), FEEDBACK_TOKEN, batch=256, progress=False)["failed"] == 0
    acc, _ = wait_until(lambda: learned(url, ko.test), timeout=240, interval=1.0, what="Korean learned")
    life["taught"] = ko.test
    before = converge(life, "replicas converged before the stop")
    serve.delete(APP)
    deploy_online(life["store"], life["state"], name=APP, **LEARNER)
    wait_until(lambda: http_ok(f"{url}/healthz", timeout=2), timeout=240, interval=0.1, what="healthz after restart")
    after_acc, versions = served_accuracy(url, ko.test)  # immediately: nothing may be pending any more
    # The restarted lineage's first version is the base plus one replay of the judged log
    # (docs/ONLINE_LEARNING.md); the follow-up passes the first lineage had come after it. So it
    # is held to the bar that counted as learned (0.8, or what was measured then if lower), less
    # 5 points, not to whatever the first lineage reached with its follow-ups.
    assert after_acc >= min(acc, 0.8) - 0.05, f"Korean accuracy {acc:.3f} before the stop, {after_acc:.3f} at ready"
    assert min(versions) > before["version"], versions
    after = converge(life, "replicas converged after the restart")
    assert after["lineage"] != before["lineage"] and after["replayed_on_start"] > 0


def test_plain_retrain_while_serving_is_adopted_by_every_replica(life):
    """A plain `python -m train` publish while serving: adopted as a new base (the log replayed on
    top), a replica started after it and the ones before converge on one (lineage, version, digest)."""
    import ray
    from ray.util.state import list_actors

    url = life["url"]
    before = converge(life, "converged before the retrain")
    import tempfile

    from online_learning.digest import model_digest
    from train.model import load_model_dir, save_model_dir
    from train.store import ModelStore

    # What `python -m train` publishes at its end: a model folder, here the suite's base with its
    # output bias moved a little (other weights than the app's first version, the same answers),
    # so a replica that kept or reloaded the old base cannot pass for one on the retrain.
    model = load_model_dir(trained_dir(life["trained"]))
    bias = model.model.get_layer("classes").bias
    bias.assign(bias.numpy() + 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, tmp)
        retrained = ModelStore(life["store"]).publish(tmp)  # the store numbers it; the learner goes above
    old_base = model_digest(ModelStore(life["store"]).load(ModelStore(life["store"]).versions()[0]).model).hexdigest()
    assert model_digest(ModelStore(life["store"]).load(retrained).model).hexdigest() != old_base
    replicas = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:Classifier"), ("state", "=", "ALIVE")])

    def replaced():  # the new replica's process is up (it may still be syncing): the dead one is gone
        alive = {a.actor_id for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:Classifier"),
                                                          ("state", "=", "ALIVE")])}
        return replicas[0].actor_id not in alive and len(alive) == len(replicas)

    def published():
        s = learner_status(url)
        return s.get("base_version") == retrained and s.get("replaying") is False and s
    ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)  # Serve starts another
    wait_until(replaced, timeout=60, what="a replica started in place of the killed one")
    # Feedback flows while the learner replays the log onto the retrain and the new replica takes
    # full weights (if the learner was quicker than the kill, the probe still posts a few events).
    with FeedbackProbe(url) as probe:
        wait_until(published, timeout=180, what="the learner published a lineage on the retrain")
    # Feedback stopped: publishes stop after the follow-up rounds and every replica must hold the
    # learner's exact weights (under continuous publishing the reports always lag one poll).
    status = wait_until(lambda: (s := replicas_converged(url)) and s["base_version"] == retrained and s,
                        timeout=60, what="retrain adopted by every replica")
    assert probe.latencies and max(probe.latencies) < 1.0, f"feedback latencies {sorted(probe.latencies)[-5:]}"
    assert status["version"] > max(retrained, before["version"])
    life["ids"].record(url)
    if life.get("taught"):  # the first test taught Korean: the log is replayed onto the retrain
        acc, _ = served_accuracy(url, life["taught"])
        assert acc >= 0.7, f"the log replayed onto the retrain: Korean accuracy {acc:.3f}"


def test_a_hung_learner_is_reported_and_serving_goes_on(life):
    """SIGSTOP the learner: replicas say so (learner unreachable, stale past max_staleness_s),
    keep answering, refuse feedback at once instead of hanging; after SIGCONT they are in sync."""
    import os
    import signal

    from tests.test_online_learning import learner_pid

    url = life["url"]
    pid = wait_until(lambda: learner_pid(APP), timeout=60, what="learner pid")
    replica_views = lambda: [requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json() for _ in range(4)]
    os.kill(pid, signal.SIGSTOP)
    try:
        stale = wait_until(lambda: (v := replica_views()) and all(b.get("stale") and b["learner_sync_error"] for b in v)
                           and v, timeout=120, what="every replica reporting the learner unreachable and stale")
        assert all(b["staleness_s"] > LEARNER["max_staleness_s"] and b["ready"] for b in stale)
        health = requests.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["learner"] == "unreachable"
        assert requests.post(f"{url}/v1/predict", json={"text": "turn on the lights"}, timeout=10).status_code == 200
        started = time.monotonic()
        r = requests.post(f"{url}/v1/feedback", headers=AUTH, timeout=30,
                          json={"event_id": "while-hung", "text": "turn on the lights", "label": "HassTurnOn"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "learner_unavailable"
        assert time.monotonic() - started < 2.0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert learner_pid(APP) == pid  # the same learner resumed (Serve did not replace it meanwhile)
    fresh = wait_until(lambda: (v := replica_views()) and all(not b["stale"] and not b["learner_sync_error"] for b in v)
                       and v, timeout=60, what="replicas back in sync")
    assert all(b["staleness_s"] < LEARNER["max_staleness_s"] for b in fresh)
    converge(life, "converged after the learner resumed")


def test_every_number_names_one_set_of_weights(life):
    life["ids"].record(life["url"], polls=10)
    life["ids"].assert_one_digest_per_number()
    assert len(life["ids"].seen) >= 3
