"""`python -m serve run` starts a local Ray with token authentication on (Ray 2.60's local
default); `serve status` in another shell works with the line it prints and is refused without it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from serve.haproxy_cleanup import haproxy_pids
from serve.process import ServerProcess, local_config
from tests._helpers import stop_stray_haproxy
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVE_CLI = str(Path(sys.executable).parent / "serve")
_DASHBOARD = re.compile(r"dashboard at\s*(?:\x1b\[[0-9;]*m)*\s*(?:http://)?([0-9.]+:\d+)")


class PythonMServeRun(ServerProcess):
    """`python -m serve run CONFIG` as a user types it, stopped with Ctrl-C (SIGINT) by PID."""

    stop_signal = signal.SIGINT  # python -m serve run passes it on to serve run

    def __init__(self, config_path: Path, port: int, env: dict):
        super().__init__("python-m-serve-run", port, ready_timeout_s=300)
        self.config_path, self.env = config_path, env

    def command(self) -> list[str]:
        # As a shell's background job (`... &`) starts it: with SIGINT ignored, which children inherit.
        return ["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-m", "serve", "run", str(self.config_path)]

    def environment(self) -> dict:
        return self.env

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")


def _shell_env(**extra) -> dict:
    """A fresh shell's environment: none of the Ray settings this test process may carry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
           and not k.startswith(("RAY_SERVE_", "TEXTSERVE_"))}
    return {**env, **extra}


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
        # Its HAProxy's stats and metrics listeners on free ports: the test session's own Ray (when
        # other tests started it) already holds the defaults, 8404 and 9101.
        # Its replicas' direct-ingress ports from a range of their own: Serve numbers them from
        # 30000 in every Ray instance, so they never meet the test session's replicas' ports.
        env = _shell_env(PYTHONPATH=str(ROOT), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
                         RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                         RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT="31000", RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT="32000",
                         RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT="41000", RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT="42000")
        with PythonMServeRun(config_path, port, env) as server:
            log = server.log()
            assert "export RAY_AUTH_MODE=token" in log, log[-3000:]
            found = _DASHBOARD.search(log)
            assert found, log[-3000:]
            dashboard = f"http://{found.group(1)}"

            def serve_status(env):
                return subprocess.run([SERVE_CLI, "status", "-a", dashboard], env=env, cwd=tmp_path,
                                      capture_output=True, text=True, timeout=120)

            refused = serve_status(_shell_env())
            assert refused.returncode != 0
            assert "Authentication required" in refused.stdout + refused.stderr, refused.stderr[-2000:]

            ok = serve_status(_shell_env(RAY_AUTH_MODE="token"))  # the line python -m serve run printed
            assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
            status = yaml.safe_load(ok.stdout)
            assert status["applications"]["textserve"]["status"] == "RUNNING", ok.stdout
        # Ctrl-C (SIGINT, what PythonMServeRun stops it with) ended it; before, a background
        # job's serve run ignored it and the stop escalated to SIGKILL after 60 s.
        assert server.proc.returncode is not None and server.proc.returncode != -signal.SIGKILL, server.proc.returncode
    finally:
        stop_stray_haproxy(before)  # a fallback: python -m serve run stops its own HAProxy
