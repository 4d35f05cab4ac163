"""Observability: the loop's metrics (online_learning/metrics.py), the Prometheus scrape config and
alert rules (cluster/observability/, checked and unit-tested by promtool), the Grafana dashboard
(valid structure, only exported metric names), and the terminal status view against a real HTTP
server. No Ray: the recorders run against ray.util.metrics without a cluster (a no-op sink)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from online_learning import metrics as m
from online_learning.protocol import Accepted, Conflict, NotOwnerAnswer, WriteFailed

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "cluster" / "observability"
DASHBOARD = OBS / "grafana" / "textserve.json"

# Ray Serve's own metrics used by the dashboard and alerts (Ray 2.60; docs: "Ray Serve metrics",
# serve/monitoring), as Prometheus sees them.
RAY_SERVE_NAMES = {
    "ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket", "ray_serve_http_request_latency_ms_sum",
    "ray_serve_http_request_latency_ms_count", "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_processing_latency_ms_bucket", "ray_serve_deployment_request_counter_total",
    "ray_serve_replica_processing_queries",
}
# Metrics the replicas export outside metrics.py (serve/classifier.py), as Prometheus names them.
PROMQL_WORDS = {"sum", "by", "rate", "irate", "increase", "histogram_quantile", "max", "min", "count", "avg",
                "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "count_values", "clamp_min", "clamp_max", "le", "offset", "absent", "deriv", "delta", "time",
                "changes", "topk", "bottomk", "label_replace", "vector", "scalar", "max_over_time",
                "min_over_time", "avg_over_time", "resets", "abs", "round", "sort", "sort_desc", "quantile",
                "inf", "nan", "e", "group", "timestamp"}


def _serve_code_names() -> set[str]:
    """Metric names the serve/ code registers through ray.util.metrics, as Prometheus sees them."""
    names = set()
    for path in (ROOT / "serve").glob("*.py"):
        for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"",
                                     path.read_text()):
            full = m.PREFIX + name
            if kind == "Counter":
                names.add(full if full.endswith("_total") else full + "_total")
            elif kind == "Histogram":
                names |= {full + "_bucket", full + "_sum", full + "_count"}
            else:
                names.add(full)
    return names


def _metrics_py_names() -> set[str]:
    """Names parsed from metrics.py's source text (not imported), so the check reads the file."""
    source = (ROOT / "online_learning" / "metrics.py").read_text()
    block = source[source.index("METRICS: dict"):source.index("_BUCKETS = ")]
    names = set()
    for name, kind in re.findall(r"\"(textserve_[a-z0-9_]+)\": \(\"(counter|gauge|histogram)\"", block):
        full = m.PREFIX + name
        names |= {full + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {full}
    return names


KNOWN = _metrics_py_names() | _serve_code_names() | RAY_SERVE_NAMES


def _names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...} label matchers, strings,
    and by/without/on (...) label lists, that are not functions or keywords."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\"[^\"]*\"|'[^']*'", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\$[a-zA-Z_]+", "", expr)  # Grafana variables ($__rate_interval)
    words = set(re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", expr))
    return {w for w in words if w.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", w)}


# -- metrics.py: the pure parts and the recorders -----------------------------------------------

def test_every_metric_follows_the_conventions():
    for name, (kind, description, tags) in m.METRICS.items():
        assert re.fullmatch(r"textserve_[a-z0-9_]+", name), name
        assert description
        if kind == "counter":
            assert name.endswith("_total"), f"{name}: a counter ends in _total"
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        assert set(tags) <= {"replica", "reason", "outcome", "kind"}, f"{name}: unbounded label in {tags}"
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a histogram names its unit"


def test_held_back_reasons_map_to_a_bounded_set():
    from online_learning.round_policy import gate_reason

    class S:
        max_base_drop, gate_margin, gate_min_losses = 0.02, 0.0, 1

    assert m.held_back_kind(gate_reason(S, None, 0.9, None, None, 0)) == "no_holdout"
    assert m.held_back_kind(gate_reason(S, 0.5, 0.9, None, None, 0)) == "base"
    assert m.held_back_kind(gate_reason(S, 0.9, 0.9, 0.2, 0.8, 10)) == "feedback"
    assert gate_reason(S, 0.9, 0.9, 0.8, 0.8, 10) is None
    assert m.held_back_kind("log compacted below its offset") == "other"
    assert m.held_back_kind(None) == "other"
    assert {m.held_back_kind(r) for r in ("base x", "feedback y", "z", "")} <= set(m.HELD_BACK_KINDS)


def test_submit_outcomes_from_the_learners_answers():
    assert m.submit_outcome(Accepted(((0, False), (1, True), (2, False)))) == ("accepted", 2, 1)
    assert m.submit_outcome(Accepted(((0, True),))) == ("duplicate", 0, 1)
    assert m.submit_outcome(Conflict("a", 3))[0] == "conflict"
    assert m.submit_outcome(NotOwnerAnswer(2, "x"))[0] == "not_owner"
    assert m.submit_outcome(WriteFailed("ENOSPC", "x"))[0] == "write_error"
    assert m.submit_outcome(None)[0] == "other"
    assert {o for o, _, _ in map(m.submit_outcome, (None, Accepted(())))} <= set(m.SUBMIT_OUTCOMES)


def test_ack_to_served_counts_only_events_new_on_the_replica():
    acked = [(3, 100.0), (4, 101.0), (5, 102.0), (6, 109.0)]
    assert m.newly_served(acked, 3, 5, 110.0) == [9.0, 8.0]  # 4 and 5: above 3, up to 5
    assert m.newly_served(acked, None, 5, 110.0) == []  # first report: the replica did not exist before
    assert m.newly_served(acked, 5, 5, 110.0) == []  # nothing new
    assert m.newly_served(acked, 6, 4, 110.0) == []  # went back (another base)
    assert m.newly_served(acked, 2, 9, 105.0) == [5.0, 4.0, 3.0, 0.0]  # a clock step never gives < 0


def test_recorders_track_streaks_lineages_and_last_reports():
    """The real recorders (ray.util.metrics without a cluster records nowhere): the state they
    keep between calls is what the exported gauges show."""
    learner = m.LearnerMetrics()
    learner.round_done({"published": False, "reason": "base accuracy 0.5 < anchor 0.9 - 0.02"}, 0.1)
    learner.round_done({"published": False, "reason": m.NO_HOLDOUT}, 0.1)
    assert learner.held_back_streak == 2
    learner.round_done({"published": False, "replay": True}, 0.1)
    assert learner.held_back_streak == 2  # a replay round neither publishes nor holds back
    learner.round_done({"published": True, "version": 9, "bytes": 4096}, 0.1)
    assert learner.held_back_streak == 0
    learner.round_done({"published": False, "events": 3, "refused": 3}, 0.1)  # all refused: no candidate
    assert learner.held_back_streak == 0
    learner.replica_report("r1", 4, [])
    learner.replica_report("r1", 7, [(5, 1.0), (6, 2.0)], now=3.0)
    assert learner.last_reports == {"r1": 7}
    with pytest.raises(ValueError):
        learner.events("a text", 1)  # never a free-form label value
    with pytest.raises(ValueError):
        learner.published(3, 10, "full")
    learner.submitted(Accepted(((0, False), (1, True))))
    learner.submitted(Conflict("x", 0))
    learner.events("deferred", 4)
    assert learner.counts() == {"requests": {"accepted": 1, "conflict": 1},
                                "events": {"accepted": 1, "duplicate": 1, "conflicting": 1, "deferred": 4},
                                "held_back": {"base": 1, "no_holdout": 1}, "publishes": 1}
    learner.round_failed(2)
    assert learner.failed_in_row == 2
    learner.round_failed(0)
    assert learner.failed_in_row == 0
    learner.log_state({"disk_bytes": 10, "segments": 1, "next_offset": 4}, 1)

    replica = m.ReplicaMetrics("r1", max_staleness_s=10.0)
    replica.served(3, "aaa")
    replica.served(4, "aaa")
    assert replica.lineage_changes == 0
    replica.served(9, "bbb")
    assert replica.lineage_changes == 1 and replica.lineage == "bbb"
    replica.staleness(1.5)


def test_the_replicas_existing_metric_names_are_the_ones_metrics_py_declares():
    """model_follower.py's gauges and metrics.py's ReplicaMetrics must name the same series."""
    follower = (ROOT / "serve" / "model_follower.py").read_text()
    for name in re.findall(r"metrics\.Gauge\(\"([a-z0-9_]+)\"", follower):
        assert name in m.METRICS, f"{name} (serve/model_follower.py) is not declared in online_learning/metrics.py"


# -- Prometheus: the scrape config and the alert rules, checked by a real promtool -----------------

def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing: apt-get install prometheus (Debian's package has the server and promtool)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run installs it")
        pytest.skip(reason)
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([_promtool(), *args], cwd=OBS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_promtool_checks_the_scrape_config():
    out = _run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out.stdout + out.stderr
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    sd = [f for job in config["scrape_configs"] for c in job.get("file_sd_configs", []) for f in c["files"]]
    assert sd == ["/tmp/ray/prom_metrics_service_discovery.json"], "Ray's service-discovery file, as Ray documents it"


def test_promtool_checks_the_alert_rules():
    out = _run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def _alerts() -> list[dict]:
    groups = yaml.safe_load((OBS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_unit_tests_fire_and_stay_quiet_for_every_alert():
    tests = yaml.safe_load((OBS / "tests" / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), f"alerts with no test where they fire: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts with no test where they stay quiet: {sorted(names - quiet)}"
    out = _run_promtool("test", "rules", "tests/alerts_test.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_expressions_use_only_exported_metrics():
    for rule in _alerts():
        unknown = _names_in(rule["expr"]) - KNOWN
        assert not unknown, f"alert {rule['alert']} uses metrics nothing exports: {sorted(unknown)}"


def test_the_name_check_catches_an_unknown_metric():
    assert _names_in('sum by (replica) (rate(ray_textserve_nope_total{outcome="x"}[5m]))') == {"ray_textserve_nope_total"}
    assert _names_in("histogram_quantile(0.99, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket"
                     "[$__rate_interval])))") <= KNOWN


# -- the Grafana dashboard ---------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label): the metric is the query
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            assert metric, f"variable {var['name']}: expected label_values(metric, label), got {var['definition']!r}"
            out.append((f"variable {var['name']}", metric.group(1)))
    return out


def test_dashboard_is_a_valid_grafana_model():
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, f"{panel['title']}: gridPos {pos}"
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel.get("description"), f"{panel['title']}: say what the panel means"
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), f"{panel['title']}: targets with unique refIds"
        for target in panel["targets"]:
            for var in re.findall(r"\$([a-zA-Z]\w*)", target["expr"]):
                assert var in variables, f"{panel['title']}: ${var} is not a dashboard variable"


def test_dashboard_queries_use_only_exported_metrics():
    for title, expr in _queries(_dashboard()):
        names = _names_in(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert not names - KNOWN, f"{title} queries metrics nothing exports: {sorted(names - KNOWN)}"


def test_dashboard_shows_every_promise():
    used = set().union(*(_names_in(expr) for _, expr in _queries(_dashboard())))
    wanted = {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
              "ray_textserve_model_version", "ray_textserve_replica_staleness_s",
              "ray_textserve_replica_ack_to_served_seconds_bucket", "ray_textserve_learner_publishes_total",
              "ray_textserve_learner_held_back_rounds_total", "ray_textserve_feedback_requests_total",
              "ray_textserve_learner_unjudged_events"}
    assert not wanted - used, f"panels missing for {sorted(wanted - used)}"
    declared = {m.PREFIX + n for n in m.METRICS}
    shown = {n.removesuffix("_bucket") for n in used}
    assert not declared - shown, f"metrics.py declares metrics no panel shows: {sorted(declared - shown)}"


# -- the terminal status view, against a real HTTP server ------------------------------------------

STATUS_TOKEN = "operator-token-for-the-status-test"


def _model_answer(now: float) -> dict:
    """A /v1/model operator answer with the fields serve/classifier.py and OnlineLearner.status() give."""
    return {
        "replica": "abc123def456", "model_version": 41, "lineage": "1f2e3d4c5b6a", "log_offset": 120,
        "staleness_s": 0.4, "stale": False, "ready": True, "readiness": "ready", "learner_sync_error": None,
        "labels": ["a", "b"], "weights_digest": "d41", "pid": 1, "started_at": now - 100, "time": now,
        "learner": {
            "lineage": "1f2e3d4c5b6a", "version": 42, "digest": "d42", "published_at": now - 30,
            "replaying": False, "ready_offset": 90, "judged_offset": 130, "applied_offset": 130,
            "served_offset": 130, "log_length": 140, "pending": 9, "held_back": 3, "refused": 5,
            "followups_left": 0, "staleness_s": 2.5, "owner": True, "standby": False, "epoch": 7, "fenced": None,
            "publish_interval_s": 1.0, "max_staleness_s": 10.0,
            "replicas": {
                "abc123def456": {"lineage": "1f2e3d4c5b6a", "version": 41, "digest": "d41", "log_offset": 120,
                                 "reported_at": now - 0.2},
                "zzz999": {"lineage": "1f2e3d4c5b6a", "version": 42, "digest": "d42", "log_offset": 130,
                           "reported_at": now - 0.3},
                "old777": {"lineage": "0000aaaa1111", "version": 12, "digest": "d12", "log_offset": 10,
                           "reported_at": now - 5},
            },
            "history": [
                {"time": now - 60, "published": True, "version": 41, "events": 4, "bytes": 2048},
                {"time": now - 45, "published": False, "events": 6,
                 "reason": "base accuracy 0.800 < anchor 0.900 - 0.02", "version": None, "bytes": 0},
                {"time": now - 30, "published": True, "version": 42, "events": 2, "bytes": 4096},
            ],
            "feedback_outcomes": {"requests": {"accepted": 9, "conflict": 1}, "events": {"accepted": 140},
                                  "held_back": {"base": 3}, "publishes": 2},
        },
    }


@pytest.fixture
def model_server():
    """A real HTTP server answering GET /v1/model as the app does: the operator view for the right
    bearer token, the public view (versions and labels only) for a missing or wrong one."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"hits": 0, "version": 42}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            state["hits"] += 1
            if self.path != "/v1/model":
                self.send_response(404)
                self.end_headers()
                return
            answer = _model_answer(__import__("time").time())
            answer["learner"]["version"] = state["version"]
            if self.headers.get("Authorization") != f"Bearer {STATUS_TOKEN}":
                answer = {"model_version": answer["model_version"], "labels": answer["labels"]}
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def _status(*args: str, token: str | None = STATUS_TOKEN, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TEXTSERVE_FEEDBACK_TOKEN"}
    if token is not None:
        env["TEXTSERVE_FEEDBACK_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "online_learning", "status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_status_prints_replicas_learner_history_and_outcomes(model_server):
    url, _ = model_server
    done = _status("--url", url)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("abc123def456*"))
    assert "41" in row and "1f2e3d4c5b6a" in row and "0.4s" in row and "ready" in row  # the answering replica
    row = next(line for line in lines if line.startswith("zzz999"))
    assert " current" in row and "0.0s" in row
    row = next(line for line in lines if line.startswith("old777"))
    assert "behind STALE (other lineage)" in row and ">=30" in row  # behind since v42 was published 30 s ago
    assert "learner: v42 lineage 1f2e3d4c5b6a (owner, epoch 7)" in out
    assert "backlog (unjudged) 9" in out and "held back 3 rounds" in out
    assert "published v42" in out and "held back" in out and "base accuracy 0.800" in out
    assert "requests: accepted 9, conflict 1" in out and "held_back: base 3" in out


def test_status_says_what_is_wrong(model_server):
    url, _ = model_server
    missing = _status("--url", url, token=None)
    assert missing.returncode == 2 and "TEXTSERVE_FEEDBACK_TOKEN" in missing.stderr and not missing.stdout
    wrong = _status("--url", url, token="not-the-token")
    assert wrong.returncode == 2 and "token is not the app's operator token" in wrong.stderr
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = _status("--url", closed)
    assert down.returncode == 2 and f"cannot reach the app at {closed}" in down.stderr
    elsewhere = _status("--url", url + "/nothing-here")
    assert elsewhere.returncode == 1 and "HTTP 404" in elsewhere.stderr


def test_status_watch_redraws_until_interrupted(model_server):
    import signal
    import time

    url, state = model_server
    env = {**os.environ, "TEXTSERVE_FEEDBACK_TOKEN": STATUS_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "online_learning", "status", "--url", url, "--watch", "0.2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while state["hits"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state["hits"] >= 2, "no second fetch: --watch does not refresh"
        state["version"] = 99  # the next redraw shows what changed
        hits = state["hits"]
        while state["hits"] < hits + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.count("learner: v42") >= 2, "redrawn"
    assert "learner: v99" in out.rsplit("learner: v42", 1)[1], "a redraw shows what changed"


# -- a real Ray and a real Prometheus: the names Ray exports, scraped through our config --------------

def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "the prometheus server is missing: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run installs it")
        pytest.skip(reason)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prom_query(base: str, expr: str) -> dict:
    import urllib.parse
    import urllib.request

    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_prometheus_scrapes_every_declared_metric_from_ray(ray_cluster, tmp_path):
    """Every metric metrics.py declares reaches a real Prometheus, under the name the dashboard and
    alerts use, through prometheus.yml's service discovery of Ray's metrics agents; and every
    dashboard query and alert expression is valid PromQL to that Prometheus."""
    import time

    import ray
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    prometheus = _prometheus()

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self) -> int:
            from online_learning.metrics import LearnerMetrics, ReplicaMetrics
            from online_learning.protocol import Accepted, Conflict

            learner, replica = LearnerMetrics(), ReplicaMetrics("replica-a", max_staleness_s=10.0)
            learner.submitted(Accepted(((0, False), (1, True))))
            learner.submitted(Conflict("e", 0))
            learner.events("refused", 2)
            learner.round_done({"published": False, "reason": "feedback holdout 0.1 < served 0.9 - 0"}, 0.05)
            learner.round_done({"published": True, "version": 5, "bytes": 4096}, 0.05)
            learner.published(6, 1 << 20, "lineage")
            learner.round_failed(1)
            learner.log_state({"disk_bytes": 512, "segments": 1, "next_offset": 3}, 0)
            learner.replica_report("replica-a", 0, [])
            learner.replica_report("replica-a", 2, [(1, time.time() - 1), (2, time.time())])
            replica.served(5, "lineage-1")
            replica.served(6, "lineage-2")
            replica.staleness(0.5)
            self.keep = (learner, replica)  # the recorders live as long as the actor
            return os.getpid()

    recorder = Recorder.remote()
    ray.get(recorder.record.remote())
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [os.path.join(session_dir,
                                                                               PROMETHEUS_SERVICE_DISCOVERY_FILE)]
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(OBS / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        wanted = {m.PREFIX + name + ("_count" if kind == "histogram" else "")
                  for name, (kind, _, _) in m.METRICS.items()}
        missing = set(wanted)
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            try:
                found = _prom_query(base, "count by (__name__) ({__name__=~\"ray_textserve_.*\"})")
                missing = wanted - {r["metric"]["__name__"] for r in found["data"]["result"]}
            except OSError:  # Prometheus still starting
                pass
            if missing:
                time.sleep(0.5)
        log = (tmp_path / "prometheus.log").read_text()[-3000:]
        assert not missing, f"Prometheus never saw {sorted(missing)}; its log:\n{log}"
        from tests._helpers import wait_until

        # The names may come first from the suite's running apps (their replicas export them too):
        # wait for this recorder's own series.
        def recorded_version():
            found = _prom_query(base, 'max by (replica) (ray_textserve_model_version{replica="replica-a"})')
            return [r["value"][1] for r in found["data"]["result"]] or None
        assert wait_until(recorded_version, timeout=60, what="replica-a's version in Prometheus") == ["6"]
        for title, expr in _queries(_dashboard()) + [(r["alert"], r["expr"]) for r in _alerts()]:
            answer = _prom_query(base, expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
                                 .replace("$application", ".*"))
            assert answer["status"] == "success", f"{title}: {answer}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        ray.kill(recorder)


# -- KubeRay: the monitors and the alert rules as a PrometheusRule ---------------------------------

def test_kuberay_monitors_select_every_ray_pods_metrics_port():
    docs = list(yaml.safe_load_all((OBS / "kuberay-monitors.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"PodMonitor"}
    node_types = set()
    for d in docs:
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        node_types.add(d["spec"]["selector"]["matchLabels"]["ray.io/node-type"])
        assert [e["port"] for e in d["spec"]["podMetricsEndpoints"]] == ["metrics"]  # KubeRay's name for 8080
    assert node_types == {"head", "worker"}


def test_alerts_wrap_into_a_prometheus_rule_as_the_docs_say():
    """docs/OBSERVABILITY.md builds the PrometheusRule by indenting alerts.yml under `spec:`."""
    header = ("apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: textserve\n"
              "  namespace: prometheus-system\n  labels: {release: prometheus}\nspec:\n")
    body = "".join("  " + line for line in (OBS / "alerts.yml").read_text().splitlines(True))  # sed 's/^/  /'
    rule = yaml.safe_load(header + body)
    assert rule["spec"]["groups"] == yaml.safe_load((OBS / "alerts.yml").read_text())["groups"]
    assert "sed 's/^/  /' cluster/observability/alerts.yml" in (ROOT / "docs" / "OBSERVABILITY.md").read_text()


# -- a real app, scraped by a real Prometheus ---------------------------------------------------------

def _start_prometheus(workdir: Path):
    """A real Prometheus on a free loopback port, with prometheus.yml pointed at this Ray session's
    service-discovery file, scraping and evaluating alerts.yml every second. (process, base URL)."""
    import ray
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    prometheus = _prometheus()
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [os.path.join(session_dir,
                                                                               PROMETHEUS_SERVICE_DISCOVERY_FILE)]
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(OBS / "alerts.yml")]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"))
    return proc, f"http://127.0.0.1:{port}"


def _values(base: str, expr: str) -> dict[str, float]:
    """{replica or "": value} of an instant query (empty while Prometheus starts)."""
    try:
        answer = _prom_query(base, expr)
    except OSError:
        return {}
    return {r["metric"].get("replica", ""): float(r["value"][1]) for r in answer["data"]["result"]}


@pytest.fixture(scope="module")
def observed_app(ray_cluster, base_url, trained_store, tmp_path_factory):
    """The real app (Classifier x2 + OnlineLearner) with predictions and feedback sent, and a real
    Prometheus scraping Ray through prometheus.yml, evaluating alerts.yml."""
    import requests
    from ray import serve

    from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, wait_until

    root = tmp_path_factory.mktemp("observed")
    store, state = str(root / "store"), str(root / "state")
    shutil.copytree(trained_store, store)
    deploy_online(store, state, name="observed", classifier_replicas=2)
    url = f"{base_url}/observed"
    auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    proc, prom = _start_prometheus(root / "prometheus")
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="the observed app")
        events = []
        for i in range(20):  # feedback that agrees with the model: the gate publishes it
            answer = requests.post(f"{url}/v1/predict", json={"text": f"turn on the kitchen light {i}"}, timeout=30)
            assert answer.status_code == 200, answer.text
            events.append({"event_id": f"obs-{i}", "text": f"turn on the kitchen light {i}",
                           "label": answer.json()["label"]})
        r = requests.post(f"{url}/v1/feedback", json=events, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        requests.post(f"{url}/v1/feedback", json=events[:2], headers=auth, timeout=30)  # duplicates
        yield {"url": url, "prom": prom, "auth": auth, "workdir": root / "prometheus", "events": len(events)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        serve.delete("observed")


def test_version_and_staleness_series_match_the_apps_model_answer(observed_app):
    import requests

    from tests._helpers import wait_until

    url, prom, auth = observed_app["url"], observed_app["prom"], observed_app["auth"]

    def agree():
        learner = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()["learner"]
        reported = {name: rep["version"] for name, rep in learner["replicas"].items()}
        scraped = _values(prom, "max by (replica) (ray_textserve_model_version)")
        return reported if reported and all(scraped.get(n) == v for n, v in reported.items()) else None

    reported = wait_until(agree, timeout=90, what="Prometheus' versions per replica equal to /v1/model's")
    staleness = _values(prom, "max by (replica) (ray_textserve_replica_staleness_s)")
    assert set(reported) <= set(staleness), f"no staleness series for {set(reported) - set(staleness)}"
    assert all(v < 5.0 for n, v in staleness.items() if n in reported), staleness  # in sync, under the bound


def test_status_matches_a_real_apps_model_answer(observed_app):
    """The real app (Classifier x2 + OnlineLearner): after its feedback is judged, the status
    view shows the learner's version and every replica the learner reports, as /v1/model says
    them."""
    import requests

    from tests._helpers import FEEDBACK_TOKEN, wait_until

    url, auth = observed_app["url"], observed_app["auth"]

    def settled() -> dict | None:  # judged, published, and every replica on the learner's version
        info = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()
        learner = info.get("learner") or {}
        done = ((learner.get("judged_offset") or -1) >= observed_app["events"] - 1 and learner.get("replicas")
                and not learner.get("pending") and not learner.get("followups_left")
                and all((r["lineage"], r["version"]) == (learner["lineage"], learner["version"])
                        for r in learner["replicas"].values()))
        return info if done else None

    wait_until(settled, timeout=180, what="the learner settled and every replica on its version")

    def versions(info: dict) -> tuple:
        learner = info["learner"]
        return learner["version"], sorted((n, r["version"]) for n, r in learner["replicas"].items())

    def status_between_two_equal_answers():
        """The learner may still publish: compare only a status run that two equal /v1/model
        answers, read just before and just after it, enclose."""
        before = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()
        run = _status("--url", url, token=FEEDBACK_TOKEN)
        after = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()
        return (run, after) if versions(before) == versions(after) else None

    done, info = wait_until(status_between_two_equal_answers, timeout=60, interval=0.5,
                            what="a status run while the learner's versions stay put")
    assert done.returncode == 0, done.stderr
    learner = info["learner"]
    assert f"learner: v{learner['version']} lineage {learner['lineage'][:11]}" in done.stdout
    for name, rep in learner["replicas"].items():
        row = next(line for line in done.stdout.splitlines() if line.startswith(name[:13]))
        assert f" {rep['version']} " in row, row
    assert "backlog (unjudged) 0" in done.stdout
    wrong = _status("--url", url, token="not-the-token")
    assert wrong.returncode == 2 and "not the app's operator token" in wrong.stderr


def test_stale_replica_alert_fires_when_the_learner_stops_and_resolves_after(observed_app):
    """SIGSTOP the learner past the staleness bound: the replicas' staleness grows and
    TextserveReplicaStale fires in the real Prometheus; after SIGCONT (or Serve replacing the
    stopped learner, whichever comes first) it resolves."""
    import signal

    import requests

    from tests._helpers import wait_until

    url, prom, auth = observed_app["url"], observed_app["prom"], observed_app["auth"]
    firing = 'ALERTS{alertname="TextserveReplicaStale", alertstate="firing"}'
    assert _values(prom, firing) == {}, "stale before the learner was stopped"
    pid = requests.get(f"{url}/v1/model", headers=auth, timeout=10).json()["learner"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the learner of the app this module deployed
    try:
        fired = wait_until(lambda: _values(prom, firing) or None, timeout=120, what="TextserveReplicaStale firing")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # Serve replaced the stopped learner meanwhile (its health check)
            pass
    assert fired, fired
    wait_until(lambda: _values(prom, firing) == {}, timeout=240, what="TextserveReplicaStale resolving")


def test_every_dashboard_panel_has_data_from_the_real_app(observed_app):
    import time

    prom = observed_app["prom"]
    deadline = time.monotonic() + 60
    empty = ["?"]
    while empty and time.monotonic() < deadline:  # a panel has data when any of its queries has
        empty = []
        for panel in _dashboard()["panels"]:
            exprs = [t["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$application", ".*")
                     for t in panel.get("targets", [])]
            if exprs and not any(_prom_query(prom, e)["data"]["result"] for e in exprs):
                empty.append(f"{panel['title']}: {exprs}")
        if empty:
            time.sleep(1)
    assert not empty, "panels with no data:\n" + "\n".join(empty)
