"""Start and stop a system under test: this Serve app in a chosen variant, in its own process."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from serve.haproxy_cleanup import haproxy_pids, stop_new_haproxy
from serve.settings import FAST_INGRESS_ENV

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve_local.yaml"


@dataclass(frozen=True)
class ServeVariant:
    name: str
    fast_ingress: bool = True
    replicas: int = 1
    max_batch_size: int = 32


def variant_config(variant: ServeVariant, store: str, port: int) -> dict:
    """The local Serve config with the variant's replica count, batching and port."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config = copy.deepcopy(config)
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model_store"] = store
    dep = app["deployments"][0]
    dep.pop("autoscaling_config", None)  # fixed replica counts make steps comparable
    dep["num_replicas"] = variant.replicas
    dep["user_config"]["max_batch_size"] = variant.max_batch_size
    return config


class RunningServe:
    """`serve run` of one variant in a subprocess; stopped (with its HAProxy) on exit."""

    def __init__(self, variant: ServeVariant, store: str, port: int = 8000, ready_timeout_s: float = 300):
        self.variant, self.store, self.port, self.ready_timeout_s = variant, store, port, ready_timeout_s
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self._haproxy_before = haproxy_pids()
        self._config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(variant_config(self.variant, self.store, self.port), self._config)
        self._config.close()
        env = {k: v for k, v in os.environ.items() if k not in FAST_INGRESS_ENV}
        if self.variant.fast_ingress:
            env.update(FAST_INGRESS_ENV)
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        serve_cli = str(Path(sys.executable).parent / "serve")
        self._log = open(tempfile.mktemp(prefix=f"serve-{self.variant.name}-", suffix=".log"), "w")
        self.proc = subprocess.Popen([serve_cli, "run", self._config.name], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"{self.variant.name} not ready in {self.ready_timeout_s} s; see {self._log.name}")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        stop_new_haproxy(self._haproxy_before)
        Path(self._config.name).unlink(missing_ok=True)
        self._log.close()
