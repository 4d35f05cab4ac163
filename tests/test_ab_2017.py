"""The 2017 study's own test against the app as a user starts it: Apache Bench, 400 concurrent
users from 127.0.0.1, a new connection per request (`-l`: answers differ in length, since each
names its batch size and scores; without it ab counts every answer whose length differs from the
first one as failed), against `python -m serve run` of
cluster/serve_local.yaml with nothing changed but where it runs (the test's model store, a free
port, a temp feedback log) and with the ingress settings at their shipped defaults."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import requests
import yaml

from bench.ab import parse_ab
from serve.process import local_config
from tests._helpers import stop_stray_haproxy
from tests._servers import PythonMServeRun, second_ray_env
from tests.conftest import free_port
from serve.haproxy_cleanup import haproxy_pids

USERS, REQUESTS = 400, 8000


def test_apache_bench_400_users_against_the_shipped_config(trained_store, tmp_path):
    ab = shutil.which("ab")
    if ab is None:
        if os.environ.get("CI"):
            pytest.fail("Apache Bench (ab) is missing: .ci/run installs apache2-utils")
        pytest.skip("Apache Bench (ab) not installed: apt-get install apache2-utils")
    port = free_port()
    config = local_config(store=trained_store, port=port)
    config["applications"][0]["args"]["learner"]["state_dir"] = str(tmp_path / "online")
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    body = tmp_path / "body.json"
    body.write_text('{"text": "turn on the kitchen light"}')
    url = f"http://127.0.0.1:{port}/v1/predict"

    before = haproxy_pids()
    try:
        with PythonMServeRun(config_path, port, second_ray_env()) as server:
            for _ in range(20):  # the first calls trace the model: not the study's steady state
                assert requests.post(url, json={"text": "turn off the lights"}, timeout=30).status_code == 200
            run = subprocess.run([ab, "-l", "-c", str(USERS), "-n", str(REQUESTS), "-s", "30", "-p", str(body),
                                  "-T", "application/json", url], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + server.log()[-3000:]
    finally:
        stop_stray_haproxy(before)  # a fallback: python -m serve run stops its own HAProxy
    report = parse_ab(run.stdout, USERS)
    print(f"ab -c {USERS} -n {REQUESTS} against the shipped config: {report}")
    assert report["failed"] == 0 and report["complete"] == REQUESTS, run.stdout[-2000:]  # 2xx, none failed
    assert report["p99_ms"] < 1000, run.stdout[-2000:]
