"""Run the Serve app from a config in its own `serve run` process (demo, benchmarks).

The process gets its own local Ray, so the ingress mode (set through the environment when Ray
starts) can differ between runs. Stopped with Ctrl-C semantics; the HAProxy it may leave is
stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from serve.ingress import HardenedIngress
from serve.settings import FAST_INGRESS_ENV

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve_local.yaml"


def local_config(store: str | None = None, port: int | None = None) -> dict:
    """The embedded-default Serve config, optionally pointed at another store or port."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    if port is not None:
        config["http_options"]["port"] = port
    if store is not None:
        config["applications"][0]["args"]["model_store"] = store
    return config


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, what: str) -> None:
    """Poll GET {url}/healthz until 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout_s} s")


class ServerProcess:
    """A command serving HTTP on 127.0.0.1:`port`, logging to a temp file; stopped on exit."""

    stop_signal = signal.SIGTERM

    def __init__(self, name: str, port: int, ready_timeout_s: float):
        self.name, self.port, self.ready_timeout_s = name, port, ready_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict:
        return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}

    def cleanup(self) -> None:
        """What to tidy after the process has stopped."""

    def __enter__(self):
        fd, self.log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, self.ready_timeout_s, f"{self.name} (log: {self.log_path})")
        except (RuntimeError, TimeoutError):
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.cleanup()
        self._log.close()


class RunningServe(ServerProcess):
    """`serve run` of a config in its own local Ray; the fast ingress on unless told otherwise."""

    stop_signal = signal.SIGINT  # serve run shuts Serve and its Ray down on Ctrl-C

    def __init__(self, config: dict, fast_ingress: bool = True, ready_timeout_s: float = 300, name: str = "serve",
                 ingress_settings: dict[str, str] | None = None):
        super().__init__(name, config.get("http_options", {}).get("port", 8000), ready_timeout_s)
        self.config, self.fast_ingress, self.ingress_settings = config, fast_ingress, ingress_settings

    def command(self) -> list[str]:
        self._ingress = HardenedIngress(overrides=self.ingress_settings)
        self._ingress_env = self._ingress.__enter__()
        fd, self._config_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.config, f)
        return [str(Path(sys.executable).parent / "serve"), "run", self._config_path]

    def environment(self) -> dict:
        env = {k: v for k, v in super().environment().items() if k not in FAST_INGRESS_ENV}
        return {**env, **(self._ingress_env if self.fast_ingress else {})}

    def cleanup(self) -> None:
        self._ingress.__exit__(None, None, None)
        Path(self._config_path).unlink(missing_ok=True)
