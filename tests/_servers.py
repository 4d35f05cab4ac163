"""`python -m serve run` as a user runs it, in a Ray instance of its own beside the test session's."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from serve.process import ServerProcess
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


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


def fresh_shell_env(**extra) -> dict:
    """A fresh shell's environment: none of the Ray settings this test process may carry."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
           and not k.startswith(("RAY_SERVE_", "TEXTSERVE_"))}
    return {**env, **extra}


def second_ray_env(**extra) -> dict:
    """A fresh shell's environment with the ports of a second Ray instance moved off the test
    session's: its HAProxy's stats and metrics listeners on free ports (the session's Ray holds
    the defaults, 8404 and 9101), its replicas' direct-ingress ports from ranges of their own
    (Serve numbers them from 30000 in every Ray instance). Where things listen, not how the app
    behaves."""
    ports = {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
             "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "31000", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "32000",
             "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "41000", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "42000"}
    return fresh_shell_env(PYTHONPATH=str(ROOT), **{**ports, **extra})
