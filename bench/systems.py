"""The systems under test, each in its own process: this Serve app in chosen variants, the 2017
architecture, a tuned single process, and a no-op server for the client's own ceiling."""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass

from serve.process import RunningServe, ServerProcess, local_config


@dataclass(frozen=True)
class ServeVariant:
    name: str
    fast_ingress: bool = True
    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_timeout_s: float | None = None  # None: the config's
    kind: str = "fixed"  # fixed: learner off, fixed replicas; shipped: the config as shipped; noop: Serve's floor


def variant_config(variant: ServeVariant, store: str, port: int, state_dir: str | None = None) -> dict:
    """The local Serve config with the variant's replica count, batching and port; no learner.

    kind "shipped": cluster/serve_local.yaml as `python -m serve run` starts it (learner on,
    autoscaling as shipped), only the store, port and the learner's state folder (`state_dir`)
    changed. kind "noop": the same Serve settings serving bench.noop_serve's fixed answer."""
    config = local_config(store, port)
    if variant.kind == "shipped":
        config["applications"][0]["args"]["learner"]["state_dir"] = state_dir
        return config
    if variant.kind == "noop":
        app = config["applications"][0]
        dep = app["deployments"][0]
        keep = ("ray_actor_options", "max_ongoing_requests", "max_queued_requests", "backpressure_config")
        app.update(import_path="bench.noop_serve:app", name="noop")
        app.pop("args", None)
        app["deployments"] = [{"name": "NoopServe", "num_replicas": variant.replicas, **{k: dep[k] for k in keep}}]
        return config
    app = config["applications"][0]
    app["args"]["learner"] = None  # serving alone: online learning is measured by bench freshness
    dep = app["deployments"][0]
    dep.pop("autoscaling_config", None)  # fixed replica counts make steps comparable
    dep["num_replicas"] = variant.replicas
    dep["user_config"]["max_batch_size"] = variant.max_batch_size
    if variant.batch_wait_timeout_s is not None:
        dep["user_config"]["batch_wait_timeout_s"] = variant.batch_wait_timeout_s
    return config


# The load generator is one client address with up to 400 connections (Apache Bench and the
# aiohttp client alike); the default per-client cap (256) is for a public port, not for this.
BENCH_INGRESS = {"TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT": "2048"}


class _ServeWithStateDir(RunningServe):
    """A RunningServe whose learner keeps its feedback log in a temp folder removed on exit."""

    def __init__(self, *args, state_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dir = state_dir

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def start_variant(variant: ServeVariant, store: str, port: int = 8000) -> RunningServe:
    if variant.kind == "shipped":
        state_dir = tempfile.mkdtemp(prefix="bench-learner-")
        return _ServeWithStateDir(variant_config(variant, store, port, state_dir), variant.fast_ingress,
                                  name=variant.name, ingress_settings=BENCH_INGRESS, state_dir=state_dir)
    return RunningServe(variant_config(variant, store, port), variant.fast_ingress, name=variant.name,
                        ingress_settings=BENCH_INGRESS)


class RunningProcess(ServerProcess):
    """`python -m MODULE ARGS --port PORT` serving HTTP on 127.0.0.1."""

    def __init__(self, name: str, module: str, args: list[str], port: int, ready_timeout_s: float = 180):
        super().__init__(name, port, ready_timeout_s)
        self.module, self.args = module, args

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args, "--port", str(self.port)]


def start_baseline(name: str, store: str) -> RunningProcess:
    modules = {"flask-2017": ("bench.baselines.flask_2017", 8001), "tuned-single": ("bench.baselines.tuned_single", 8002)}
    module, port = modules[name]
    return RunningProcess(name, module, ["--store", store], port)


def start_noop() -> RunningProcess:
    return RunningProcess("noop", "bench.baselines.noop", [], 8003, ready_timeout_s=60)
