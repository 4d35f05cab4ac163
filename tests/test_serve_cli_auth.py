"""`python -m serve run` starts a local Ray with token authentication on (Ray 2.60's local
default); `serve status` in another shell works with the line it prints and is refused without it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from serve.haproxy_cleanup import haproxy_pids
from serve.process import local_config
from tests._helpers import stop_stray_haproxy
from tests._servers import PythonMServeRun, fresh_shell_env, second_ray_env
from tests.conftest import free_port

SERVE_CLI = str(Path(sys.executable).parent / "serve")
_DASHBOARD = re.compile(r"dashboard at\s*(?:\x1b\[[0-9;]*m)*\s*(?:http://)?([0-9.]+:\d+)")


def test_serve_status_against_python_m_serve_run(trained_store, tmp_path):
    port = free_port()
    config = local_config(store=trained_store, port=port)
    app = config["applications"][0]
    app["args"]["learner"] = None  # no feedback route: no token of ours needed
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))

    before = haproxy_pids()
    try:
        env = second_ray_env()
        with PythonMServeRun(config_path, port, env) as server:
            log = server.log()
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
        # Ctrl-C (SIGINT, what PythonMServeRun stops it with) ended it; before, a background
        # job's serve run ignored it and the stop escalated to SIGKILL after 60 s.
        assert server.proc.returncode is not None and server.proc.returncode != -signal.SIGKILL, server.proc.returncode
    finally:
        stop_stray_haproxy(before)  # a fallback: python -m serve run stops its own HAProxy
