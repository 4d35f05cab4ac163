"""The app as a user starts it: `python -m serve run` of cluster/serve_local.yaml with nothing
changed but where it runs (the test's model store, a free port, a temp feedback log) and with the
ingress settings at their shipped defaults (the drain period at a stop aside, see `shipped`). One server for the module (it takes ~40 s to start on
2 cores), tried three ways:

- the 2017 study's own test: Apache Bench, 400 concurrent users from 127.0.0.1, a new connection
  per request (`-l`: answers differ in length, since each names its batch size and scores;
  without it ab counts every answer whose length differs from the first one as failed);
- `serve status` from another shell: Ray 2.60 starts a local Ray with token authentication on,
  and the line `python -m serve run` prints is what that shell needs; without it, refused;
- Ctrl-C (SIGINT) stops it, also when started as a shell's background job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from bench.ab import parse_ab
from serve.haproxy_cleanup import haproxy_pids
from serve.process import local_config
from tests._helpers import stop_stray_haproxy
from tests._servers import PythonMServeRun, fresh_shell_env, second_ray_env
from tests.conftest import free_port

USERS, REQUESTS = 400, 8000
SERVE_CLI = str(Path(sys.executable).parent / "serve")
_DASHBOARD = re.compile(r"dashboard at\s*(?:\x1b\[[0-9;]*m)*\s*(?:http://)?([0-9.]+:\d+)")


@pytest.fixture(scope="module")
def shipped(trained_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("python-m-serve-run")
    port = free_port()
    config = local_config(store=trained_store, port=port)
    config["applications"][0]["args"]["learner"]["state_dir"] = str(tmp / "online")
    config_path = tmp / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    before = haproxy_pids()
    try:
        # A stopping replica keeps answering RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s)
        # so that HAProxy sees it go in a rolling update; at a full stop that is only waiting
        # (the session's Ray shortens it too, tests/conftest.py). No request here meets a stop.
        env = second_ray_env(RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2")
        with PythonMServeRun(config_path, port, env) as server:
            yield server
        # Ctrl-C (SIGINT, what PythonMServeRun stops it with) ended it; before, a background
        # job's serve run ignored it and the stop escalated to SIGKILL after 60 s.
        assert server.proc.returncode is not None and server.proc.returncode != -signal.SIGKILL, \
            server.proc.returncode
    finally:
        stop_stray_haproxy(before)  # a fallback: python -m serve run stops its own HAProxy


def test_apache_bench_400_users_against_the_shipped_config(shipped, tmp_path):
    ab = shutil.which("ab")
    if ab is None:
        if os.environ.get("CI"):
            pytest.fail("Apache Bench (ab) is missing: .ci/run installs apache2-utils")
        pytest.skip("Apache Bench (ab) not installed: apt-get install apache2-utils")
    body = tmp_path / "body.json"
    body.write_text('{"text": "turn on the kitchen light"}')
    url = f"{shipped.url}/v1/predict"
    for _ in range(20):  # the first calls trace the model: not the study's steady state
        assert requests.post(url, json={"text": "turn off the lights"}, timeout=30).status_code == 200
    run = subprocess.run([ab, "-l", "-c", str(USERS), "-n", str(REQUESTS), "-s", "30", "-p", str(body),
                          "-T", "application/json", url], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + shipped.log()[-3000:]
    report = parse_ab(run.stdout, USERS)
    print(f"ab -c {USERS} -n {REQUESTS} against the shipped config: {report}")
    assert report["failed"] == 0 and report["complete"] == REQUESTS, run.stdout[-2000:]  # 2xx, none failed
    assert report["p99_ms"] < 1000, run.stdout[-2000:]


def test_serve_status_from_another_shell_needs_the_printed_auth_line(shipped, tmp_path):
    log = shipped.log()
    assert "export RAY_AUTH_MODE=token" in log, log[-3000:]
    found = _DASHBOARD.search(log)
    assert found, log[-3000:]
    dashboard = f"http://{found.group(1)}"

    def serve_status(env):
        return subprocess.run([SERVE_CLI, "status", "-a", dashboard], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    refused = serve_status(fresh_shell_env())
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    ok = serve_status(fresh_shell_env(RAY_AUTH_MODE="token"))  # the line python -m serve run printed
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    status = yaml.safe_load(ok.stdout)
    assert status["applications"]["textserve"]["status"] == "RUNNING", ok.stdout
