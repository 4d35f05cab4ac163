"""The systems under test, each in its own process: this Serve app in chosen variants, the 2017
architecture, a tuned single process, and a no-op server for the client's own ceiling."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve.process import RunningServe, ServerProcess, local_config


@dataclass(frozen=True)
class ServeVariant:
    name: str
    fast_ingress: bool = True
    replicas: int = 1
    max_batch_size: int | None = None  # None: the config's (serve.settings.BatchSettings)
    batch_wait_timeout_s: float | None = None  # None: the config's
    kind: str = "fixed"  # fixed: learner off, fixed replicas; shipped: the config as shipped; noop: Serve's floor
    env: tuple[tuple[str, str], ...] = ()  # environment the system's `serve run` gets on top of the bench's


@dataclass(frozen=True)
class SourceTree:
    """Another checkout of this project (e.g. a git worktree of an older revision), whose Serve
    systems run from its own code: its cluster/serve_local.yaml, its `python -m serve run` (so its
    own hardened ingress) and its packages first on the path of every process, Ray's included.
    The interpreter and installed packages are this process's."""

    name: str
    path: str

    @staticmethod
    def parse(spec: str) -> SourceTree:
        """NAME=PATH, checked: NAME short and plain, PATH a checkout with the files a system needs."""
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise ValueError(f"{spec!r}: give NAME=PATH, NAME of letters, digits, '_', '.', '-'")
        root = Path(path).expanduser().resolve()
        for needed in ("cluster/serve_local.yaml", "serve/__main__.py", "serve/app.py"):
            if not (root / needed).is_file():
                raise ValueError(f"{spec!r}: {root / needed} is missing; PATH must be a checkout of this project")
        return SourceTree(name, str(root))

    def local_config(self, store: str | None = None, port: int | None = None) -> dict:
        """The tree's own shipped local config, optionally pointed at another store or port."""
        config = yaml.safe_load((Path(self.path) / "cluster" / "serve_local.yaml").read_text())
        if port is not None:
            config["http_options"]["port"] = port
        if store is not None:
            config["applications"][0]["args"]["model_store"] = store
        return config

    def describe(self) -> dict:
        """Where the tree is and which commit it holds (and whether its files differ from it)."""
        def git(*args: str) -> str:
            try:
                return subprocess.run(["git", "-C", self.path, *args], capture_output=True, text=True,
                                      timeout=30, check=True).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""
        return {"path": self.path, "commit": git("rev-parse", "HEAD") or None,
                "subject": git("log", "-1", "--format=%s")[:120] or None,
                "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}


def split_system(name: str) -> tuple[str, str | None]:
    """'SYSTEM@TREE' -> (SYSTEM, TREE); a plain name -> (name, None)."""
    base, sep, tree = name.partition("@")
    return (base, tree) if sep else (name, None)


def variant_config(variant: ServeVariant, store: str, port: int, state_dir: str | None = None,
                   tree: SourceTree | None = None) -> dict:
    """The local Serve config with the variant's replica count, batching and port; no learner.

    kind "shipped": cluster/serve_local.yaml as `python -m serve run` starts it (learner on,
    autoscaling as shipped), only the store, port and the learner's state folder (`state_dir`)
    changed. kind "noop": the same Serve settings serving bench.noop_serve's fixed answer.
    With `tree`, that tree's cluster/serve_local.yaml is the shipped config."""
    config = local_config(store, port) if tree is None else tree.local_config(store, port)
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
    if variant.max_batch_size is not None:
        dep["user_config"]["max_batch_size"] = variant.max_batch_size
    if variant.batch_wait_timeout_s is not None:
        dep["user_config"]["batch_wait_timeout_s"] = variant.batch_wait_timeout_s
    return config


# Where a system runs, not how: every variant points the config at the bench's store, port and a
# temp feedback log. Anything else that differs from the shipped config is listed in the report.
_WHERE = {"applications.0.args.model_store", "http_options.port", "applications.0.args.learner.state_dir"}


def config_changes(config: dict, shipped: dict | None = None) -> dict[str, tuple]:
    """Every setting of `config` that differs from cluster/serve_local.yaml as shipped, as
    {dotted path: (shipped value, this value)} (None where a side lacks it); the store, port and
    feedback-log folder are left out (where a system runs, not how)."""
    shipped = local_config() if shipped is None else shipped
    out: dict[str, tuple] = {}

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}.{i}")
        elif a != b and path not in _WHERE:
            out[path] = (a, b)
    walk(shipped, config, "")
    return out


class _ServeWithStateDir(RunningServe):
    """A RunningServe whose learner keeps its feedback log in a temp folder removed on exit;
    `extra_env` set on top of the environment (a variant's own settings)."""

    def __init__(self, *args, state_dir: str, extra_env: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dir, self.extra_env = state_dir, extra_env or {}

    def environment(self) -> dict:
        return {**super().environment(), **self.extra_env}

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.state_dir, ignore_errors=True)


class RunningTreeServe(ServerProcess):
    """A Serve system of another source tree: `python -m serve run CONFIG` run in the tree, with
    the tree first on PYTHONPATH, so the app, its config's defaults and its hardened ingress are
    the tree's; the environment is otherwise this process's, as for a user."""

    stop_signal = signal.SIGINT  # python -m serve run passes it on to serve run, then stops its HAProxy

    def __init__(self, config: dict, tree: SourceTree, name: str, state_dir: str | None = None,
                 ready_timeout_s: float = 300):
        super().__init__(name, config.get("http_options", {}).get("port", 8000), ready_timeout_s)
        self.config, self.tree, self.state_dir = config, tree, state_dir

    def command(self) -> list[str]:
        fd, self._config_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.config, f)
        # env -C: the tree is the working folder (serve run puts it first on its own path) and the
        # process keeps its PID, so the CPU meter and the stop signal reach the tree's launcher.
        return ["env", "-C", self.tree.path, sys.executable, "-m", "serve", "run", self._config_path]

    def environment(self) -> dict:
        env = super().environment()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.tree.path, env.get("PYTHONPATH", "")) if p)
        return env

    def cleanup(self) -> None:
        Path(self._config_path).unlink(missing_ok=True)
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def start_variant(variant: ServeVariant, store: str, port: int = 8000,
                  tree: SourceTree | None = None) -> ServerProcess:
    """The variant in its own `serve run`, with the ingress exactly as shipped (its defaults, and
    what this process's environment sets, as for a user); with `tree`, the tree's own app, config
    and ingress (RunningTreeServe)."""
    if tree is not None:
        if variant.env:
            raise ValueError(f"{variant.name}: a source tree's system runs with the bench's environment only")
        if not variant.fast_ingress:
            raise ValueError(f"{variant.name}: a source tree's system runs its own python -m serve run, "
                             "which always has the fast ingress on")
        state_dir = tempfile.mkdtemp(prefix="bench-learner-") if variant.kind == "shipped" else None
        return RunningTreeServe(variant_config(variant, store, port, state_dir, tree), tree,
                                name=f"{variant.name}@{tree.name}", state_dir=state_dir)
    if variant.kind == "shipped":
        state_dir = tempfile.mkdtemp(prefix="bench-learner-")
        return _ServeWithStateDir(variant_config(variant, store, port, state_dir), variant.fast_ingress,
                                  name=variant.name, state_dir=state_dir, extra_env=dict(variant.env))
    if variant.env:
        raise ValueError(f"{variant.name}: environment settings are only for the shipped kind")
    return RunningServe(variant_config(variant, store, port), variant.fast_ingress, name=variant.name)


def variant_changes(variant: ServeVariant, tree: SourceTree | None = None) -> dict[str, tuple]:
    """What a variant changes in the shipped config (see `config_changes`); the ingress mode too.
    With `tree`, against that tree's shipped config."""
    shipped = local_config("", 0) if tree is None else tree.local_config("", 0)
    changes = config_changes(variant_config(variant, "", 0, "", tree), shipped)
    if not variant.fast_ingress:
        changes["environment.fast_ingress"] = ("on", "off")
    for key, value in variant.env:
        changes[f"environment.{key}"] = (os.environ.get(key), value)
    return changes


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
