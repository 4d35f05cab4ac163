"""Small helpers for tests: deadline polling and a tiny labelled data file."""

from __future__ import annotations

import json
import time
from pathlib import Path


def wait_until(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s (last: {last!r})")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def train_quick_model(store_uri: str, langs=("en",), epochs: int = 10, arch: str = "lstm") -> int:
    """Fit the small model in-process (no Ray Train: seconds) and publish it; returns the version."""
    import dataclasses
    import tempfile

    import tensorflow as tf

    from train.data import DataSpec, load_dataset
    from train.model import compile_for_training, new_model, save_model_dir
    from train.store import ModelStore

    splits = load_dataset(DataSpec(langs=tuple(langs)))
    index = {label: i for i, label in enumerate(splits.labels)}
    loaded = new_model("small", splits.labels, arch)
    compile_for_training(loaded.model, 3e-3)
    ds = tf.data.Dataset.from_tensor_slices(
        ([e.text for e in splits.train], [index[e.label] for e in splits.train])).shuffle(10_000, seed=0).batch(64)
    loaded.model.fit(ds, epochs=epochs, verbose=0)
    loaded.metrics = {"data": dataclasses.asdict(DataSpec(langs=tuple(langs)))}  # as python -m train records
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(loaded, tmp)
        return ModelStore(store_uri).publish(tmp)


def trained_dir(trained_store: str) -> Path:
    """The suite's base model (the `trained_store` fixture's first version: apps that serve from
    that store add learner snapshots above it) as a folder, ready to publish into another store."""
    from train.store import ModelStore

    local = ModelStore(trained_store)
    return local.local_path(local.versions()[0])


# Small thresholds so a test sees a scale-up within seconds of sustained load, and the scale-down after.
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
    "upscale_delay_s": 2, "downscale_delay_s": 6, "metrics_interval_s": 0.5, "look_back_period_s": 2,
}


def deploy(store: str, *, name: str = "textserve", route_prefix: str = "/", **options) -> None:
    """(Re)deploy the Classifier app with test-sized limits; same code path as the Serve config."""
    from ray import serve

    from serve.app import build_app
    from serve.classifier import Classifier
    from serve.settings import AppSettings, BatchSettings

    options.setdefault("user_config", BatchSettings().model_dump())
    options.setdefault("max_ongoing_requests", 128)
    options.setdefault("autoscaling_config", AUTOSCALING)
    options.setdefault("backpressure_config", {"status_code": 503, "retry_after_s": 1})  # as in the config
    assert build_app({"model_store": store})  # the builder the Serve config names accepts these args
    settings = AppSettings(model_store=store, max_texts=8, max_text_chars=200, max_body_bytes=4096)
    app = Classifier.options(**options).bind(settings.model_dump())
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)


FEEDBACK_TOKEN = "test-feedback-token"  # put into the environment before Ray starts (conftest)


def deploy_online(store: str, state_dir: str, *, name: str = "online", classifier_replicas: int = 2,
                  **learner) -> None:
    """The full app (Classifier + OnlineLearner) as build_app wires it, with test-sized settings."""
    from ray import serve

    from online_learning.learner import OnlineLearner
    from serve.classifier import Classifier
    from serve.settings import AppSettings

    learner = {"state_dir": state_dir, "publish_interval_s": 0.5, "max_staleness_s": 5.0,
               "snapshot_interval_s": 3.0, "rate_limit_per_s": 20, "rate_burst": 30, **learner}
    settings = AppSettings(model_store=store, max_texts=256, learner=learner)
    handle = OnlineLearner.options(ray_actor_options={"num_cpus": 0.25}).bind(
        settings.model_store, settings.learner.model_dump(), 1)
    app = Classifier.options(num_replicas=classifier_replicas, ray_actor_options={"num_cpus": 0.25},
                             max_ongoing_requests=128).bind(settings.model_dump(), handle)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)


def http_ok(url: str, timeout: float = 3.0) -> bool:
    """GET url answers 200 (False while the app is still coming up or unreachable)."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def stop_stray_haproxy(before: set[int]) -> list[int]:
    """Stop the HAProxy processes a subprocess's Serve left behind (new since `before`), never the
    test session's own: Ray reloads that one under a new PID when apps change, and its config
    path names the session's ingress folder."""
    import os

    from serve.haproxy_cleanup import haproxy_pids, stop_new_haproxy

    session_dir = os.path.dirname(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", ""))
    return stop_new_haproxy(before | (haproxy_pids(session_dir) if session_dir else set()))
