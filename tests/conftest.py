"""Shared fixtures: one real local Ray per test run, and a tiny trained model in a temp store."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    slow_ok = os.environ.get("TEXTSERVE_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow (large model); run with TEXTSERVE_SLOW=1"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance for the whole run; shut down (its processes with it) at the end."""
    import ray

    from tests._helpers import fast_serve_env

    os.environ.update(fast_serve_env())  # the Serve ingress mode is fixed when Ray starts
    ctx = ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
