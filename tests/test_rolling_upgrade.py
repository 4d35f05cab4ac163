"""`serve deploy` of a changed config under load, as an operator upgrades a running app.

`python -m serve run` of the shipped config (its own Ray, the test's store, port and feedback
log), then `serve deploy` through the dashboard of changed configs (a learner setting, a
Classifier setting, both), while clients predict, probe /healthz, send feedback without
retrying (to time the gap) and stream a file through the send CLI (which retries as documented).
Checked on outcomes: every prediction answered 200, /healthz 200 throughout, the longest stretch
of refused feedback per upgrade, the CLI's exit status and summary, every acknowledged event in
the log exactly once, each replica's versions never going back, and the learner publishing
(staleness bound) after the last upgrade.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import requests
import yaml

from serve.haproxy_cleanup import haproxy_pids
from serve.process import local_config
from tests._helpers import stop_stray_haproxy, wait_until, write_jsonl
from tests._servers import PythonMServeRun, second_ray_env
from tests._helpers import FEEDBACK_TOKEN
from tests.conftest import free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.slow(reason="five deploys under load take ~10 minutes on 2 cores (make test-upgrade)")]

DEPLOYS = int(os.environ.get("TEXTSERVE_UPGRADE_DEPLOYS", "5"))
FEEDBACK_GAP_S = 2.0  # the longest feedback may be refused per upgrade
AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
LABELS = ("HassTurnOn", "HassTurnOff")


def changed(config: dict, step: int) -> dict:
    """Deploy `step`'s change: a learner setting, a Classifier setting, then both, in turn."""
    config = json.loads(json.dumps(config))
    app = config["applications"][0]
    classifier = app["deployments"][0]
    kind = ("learner", "classifier", "both")[step % 3]
    if kind in ("learner", "both"):
        app["args"]["learner"]["publish_interval_s"] = round(1.0 + 0.1 * (step + 1), 2)
    if kind in ("classifier", "both"):
        classifier["ray_actor_options"]["num_cpus"] = round(0.5 - 0.01 * (step + 1), 2)
    return config, kind


class Traffic:
    """Background clients, each recording (time, outcome) for every request it makes."""

    def __init__(self, url: str, env: dict, folder: Path, predict_clients: int = 4):
        self.url, self.env, self.folder, self.stop = url, env, folder, threading.Event()
        self.cli_runs: list[tuple[int, str]] = []  # (exit status, output) of each send CLI run
        self.predictions: list[tuple[float, object]] = []
        self.health: list[tuple[float, object]] = []
        self.feedback: list[tuple[float, object, str]] = []
        self.versions: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self._threads = [threading.Thread(target=self._predict, daemon=True) for _ in range(predict_clients)]
        self._threads += [threading.Thread(target=t, daemon=True) for t in (self._healthz, self._feedback, self._model, self._send_cli)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _outcome(self, fn):
        try:
            r = fn()
            return r.status_code, r
        except requests.RequestException as err:
            return type(err).__name__, None

    def _predict(self):
        while not self.stop.is_set():
            code, r = self._outcome(lambda: requests.post(f"{self.url}/v1/predict", json={"text": "turn on the light"},
                                                          timeout=10))
            self.predictions.append((time.time(), code, r.text[:200] if r is not None and code != 200 else ""))

    def _healthz(self):
        while not self.stop.wait(0.1):
            code, _ = self._outcome(lambda: requests.get(f"{self.url}/healthz", timeout=10))
            self.health.append((time.time(), code))

    def _feedback(self):
        i = 0
        while not self.stop.wait(0.1):
            i += 1
            event = {"event_id": f"probe-{i}", "text": f"switch on lamp number {i}", "label": LABELS[i % 2]}
            code, r = self._outcome(lambda: requests.post(f"{self.url}/v1/feedback", json=event, headers=AUTH,
                                                          timeout=10))
            offset = r.json()["offsets"][0] if code == 202 else None
            self.feedback.append((time.time(), code, event["event_id"], offset))

    def _send_cli(self):
        """The send CLI run again and again on small files, as a feedback pipeline would."""
        run = 0
        while not self.stop.wait(0.5):
            run += 1
            events = [{"event_id": f"cli-{run}-{i}", "text": f"please turn on heater {run} {i}", "label": LABELS[i % 2]}
                      for i in range(6)]
            path = write_jsonl(self.folder / f"send-{run}.jsonl", events)
            done = subprocess.run([sys.executable, "-m", "online_learning", "send", "--url", self.url, "--file",
                                   str(path), "--batch", "2"], env={**self.env, "TQDM_DISABLE": "1"},
                                  capture_output=True, text=True, timeout=300)
            self.cli_runs.append((done.returncode, done.stdout[-1000:] + done.stderr[-1000:]))

    def _model(self):
        while not self.stop.wait(0.25):
            code, r = self._outcome(lambda: requests.get(f"{self.url}/v1/model", headers=AUTH, timeout=10))
            if code == 200:
                info = r.json()
                self.versions[info["replica"]].append((info["lineage"], info["model_version"]))


def longest_gap(records: list[tuple], ok, start: float, end: float) -> float:
    """The longest stretch within [start, end] from a failed request to the next good one."""
    gap, failing_since = 0.0, None
    for t, code, *_ in records:
        if t < start or t > end:
            continue
        if ok(code):
            if failing_since is not None:
                gap = max(gap, t - failing_since)
            failing_since = None
        elif failing_since is None:
            failing_since = t
    if failing_since is not None:
        gap = max(gap, end - failing_since)
    return gap


def dashboard_url(server: PythonMServeRun) -> str:
    found = re.findall(r"dashboard at (?:\x1b\[\d+m)*(http://127\.0\.0\.1:\d+)", server.log())
    assert found, server.log()[-3000:]
    return found[-1]


def serve_status(cli_env: dict, dashboard: str) -> dict:
    run = subprocess.run([str(Path(sys.executable).with_name("serve")), "status", "-a", dashboard],
                         capture_output=True, text=True, env=cli_env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return yaml.safe_load(run.stdout)


def settled(cli_env: dict, dashboard: str, wanted: dict) -> bool:
    """The app RUNNING with each deployment HEALTHY at its target count and nothing starting or
    stopping."""
    app = serve_status(cli_env, dashboard)["applications"].get("textserve", {})
    if app.get("status") != "RUNNING":
        return False
    deps = app.get("deployments", {})
    return all(deps.get(name, {}).get("status") == "HEALTHY" and deps[name].get("replica_states") == {"RUNNING": n}
               for name, n in wanted.items())


def serving(url: str) -> tuple[set[str], int]:
    """The Classifier replicas answering now (as many asks as it takes to see them all) and the
    learner's pid."""
    replicas, pid = set(), None
    for _ in range(12):
        info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
        replicas.add(info["replica"])
        pid = (info.get("learner") or {}).get("pid", pid)
    return replicas, pid


def test_five_deploys_under_load_lose_nothing(trained_store, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = local_config(store=trained_store, port=port)
    state_dir = tmp_path / "online"
    config["applications"][0]["args"]["learner"]["state_dir"] = str(state_dir)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = second_ray_env(TEXTSERVE_FEEDBACK_TOKEN=FEEDBACK_TOKEN)
    cli_env = {**env, "RAY_AUTH_MODE": "token"}
    wanted = {"Classifier": 2, "OnlineLearner": 1}
    before = haproxy_pids()
    windows = []
    try:
        with PythonMServeRun(config_path, port, env) as server:
            dashboard = dashboard_url(server)
            wait_until(lambda: settled(cli_env, dashboard, wanted), timeout=120, what="app settled")
            with Traffic(url, env, tmp_path) as traffic:
                time.sleep(3)  # traffic of the old version first
                for step in range(DEPLOYS):
                    new, kind = changed(config, step)
                    path = tmp_path / f"deploy-{step}.yaml"
                    path.write_text(yaml.safe_dump(new))
                    old_replicas, old_learner = serving(url)
                    start = time.time()
                    run = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(path), "-a",
                                          dashboard], capture_output=True, text=True, env=cli_env, timeout=120)
                    assert run.returncode == 0, run.stdout + run.stderr

                    def replaced():  # the rollout done: what the change replaces replaced, all settled
                        replicas, learner_pid = serving(url)
                        return ((kind == "classifier" or learner_pid not in (None, old_learner))
                                and (kind == "learner" or not replicas & old_replicas)
                                and settled(cli_env, dashboard, wanted))

                    wait_until(replaced, timeout=400, interval=1, what=f"deploy {step} ({kind}) rolled out")
                    windows.append((kind, start, time.time()))
                    print(f"deploy {step} ({kind}): settled in {time.time() - start:.1f} s")
            # The new learner serving: every replica within the staleness bound again, within one
            # bound's time (a replica replaced last may still be loading its first update).
            def fresh():
                info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()["learner"]
                return (info.get("owner") and info.get("staleness_s") is not None
                        and info["staleness_s"] <= info["max_staleness_s"] and info)

            learner = wait_until(fresh, timeout=config["applications"][0]["args"]["learner"]["max_staleness_s"],
                                 interval=0.5, what="every replica within the staleness bound")
    finally:
        stop_stray_haproxy(before)

    t0 = windows[0][1] if windows else 0
    print("deploy windows:", [(k, round(s - t0, 1), round(e - t0, 1)) for k, s, e in windows])
    failed = [(round(t - t0, 2), c, body) for t, c, body in traffic.predictions if c != 200]
    print(f"predictions: {len(traffic.predictions)}, failed {len(failed)}: {failed[:20]}")
    unhealthy = [(round(t - t0, 2), c) for t, c in traffic.health if c != 200]
    print(f"healthz: {len(traffic.health)}, not 200: {len(unhealthy)} {unhealthy[:20]}")
    gaps = [(kind, longest_gap(traffic.feedback, lambda c: c == 202, s, e)) for kind, s, e in windows]
    print(f"feedback probes: {len(traffic.feedback)}, longest refused stretch per deploy: {gaps}")
    print(f"versions per replica: { {r: (v[0], v[-1], len(v)) for r, v in traffic.versions.items()} }")
    # Every acknowledged event in the log exactly once (the probes' 202s and every CLI run's events).
    from train.log_reader import FeedbackLogReader

    events = list(FeedbackLogReader(state_dir).iter_from(0))
    logged, at = [e.event_id for e in events], {e.offset: e.event_id for e in events}
    acked = {event_id for _, code, event_id, _ in traffic.feedback if code == 202}
    # each probe's 202 named the offset its event was written at
    assert all(at.get(offset) == event_id for _, code, event_id, offset in traffic.feedback if code == 202)
    acked |= {f"cli-{run}-{i}" for run in range(1, len(traffic.cli_runs) + 1) for i in range(6)
              if traffic.cli_runs[run - 1][0] == 0}
    assert len(logged) == len(set(logged)), "an event logged twice"  # by id, whatever retried it
    assert acked <= set(logged), sorted(acked - set(logged))[:10]
    # A replica's versions never go back within a lineage.
    for replica, seen in traffic.versions.items():
        for (lineage_a, version_a), (lineage_b, version_b) in zip(seen, seen[1:]):
            assert lineage_a != lineage_b or version_b >= version_a, (replica, seen)
    # The learner serving after the last deploy keeps the staleness bound.
    assert learner.get("owner") and learner.get("staleness_s") is not None, learner
    assert learner["staleness_s"] <= learner["max_staleness_s"], learner
    assert not failed, failed[:20]
    assert not unhealthy, unhealthy[:20]
    bad_cli = [out for status, out in traffic.cli_runs if status != 0]
    print(f"send CLI runs: {len(traffic.cli_runs)}, failed {len(bad_cli)}")
    assert traffic.cli_runs and not bad_cli, bad_cli[:3]
    assert all(g <= FEEDBACK_GAP_S for _, g in gaps), gaps
