"""Shared fixtures: one real local Ray per test run, and a tiny trained model in a temp store."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Tests that need a Ray instance: through the suite's fixtures, or started by the test itself (a
# `serve run` process, a Ray Train job, a multi-node cluster). The fast lane (`make test-fast`)
# leaves them out; there `ray.init` refuses, so a test that needs Ray and is not marked fails loudly.
# The bench tests that train real models on the whole data set are marked by hand (seconds each).
_RAY_FIXTURES = {"ray_cluster", "s3_server"}
_RAY_MODULES = {"test_python_m_serve_run", "test_cluster", "test_learner_restart",
                "test_cnn_family", "test_learner_growth"}
FAST_LANE = os.environ.get("TEXTSERVE_FAST_LANE") == "1"


def pytest_itemcollected(item):
    """Marks each test as it is collected: integration when it needs Ray."""
    module = item.module.__name__.rsplit(".", 1)[-1]
    if _RAY_FIXTURES & set(item.fixturenames) or module in _RAY_MODULES:
        item.add_marker(pytest.mark.integration)


# The hostile app's modules run last, in this order, and share one deploy of it (`hostile_app`
# is per session): the security tests first, then the fuzzing, whose random feedback may teach
# that app anything. Last, so its idle replicas take no CPU from the Ray Train tests.
_LAST_MODULES = ("test_security", "test_fuzz")


def pytest_collection_modifyitems(config, items):
    rank = {name: i + 1 for i, name in enumerate(_LAST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], 0))  # stable: else as collected
    slow_ok = os.environ.get("TEXTSERVE_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not slow_ok:
            why = item.get_closest_marker("slow").kwargs.get("reason", "slow (large model)")
            item.add_marker(pytest.mark.skip(reason=f"{why}; run with TEXTSERVE_SLOW=1"))


@pytest.fixture(autouse=True, scope="session")
def _no_ray_in_the_fast_lane():
    if not FAST_LANE:
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("the fast lane runs without Ray: this test needs it, so it belongs to the integration "
                           "tests (tests/conftest.py: _RAY_FIXTURES, _RAY_MODULES)")
    real, ray.init = ray.init, refuse
    yield
    ray.init = real


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray instance for the whole run; shut down (its processes with it) at the end.
    Started after the S3 server so that Ray's workers inherit its dummy credentials and cache folder."""
    import ray

    from serve.ingress import HardenedIngress
    from tests._helpers import FEEDBACK_TOKEN

    with HardenedIngress() as ingress_env:  # HAProxy stopped and its folder removed at the end
        os.environ.update(ingress_env)  # the Serve ingress mode is fixed when Ray starts
        os.environ["TEXTSERVE_FEEDBACK_TOKEN"] = FEEDBACK_TOKEN  # replicas inherit it from the raylet
        # A deleted replica keeps answering 30 s by default so that HAProxy notices it going; the
        # tests delete apps often, and connection failures are retried on another replica anyway.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
        # Ray Train's controller looks at its worker every 2 s by default, so a finished run waits
        # up to 2 s to be noticed; the suite's runs take seconds each.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # address="local": a new instance of its own, never one found running on this machine
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
        yield ctx
        # ray.shutdown stops every Ray process this run started (Serve with them); a graceful
        # serve.shutdown() first waits ~30 s here for the HAProxy manager, for nothing.
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API: moto's standalone server on a free 127.0.0.1 port, bucket `textserve`.
    Yields {"endpoint", "bucket", "uri": prefix -> store URI with pyarrow's endpoint options}.
    Dummy credentials replace any real ones for the whole run (nothing here talks to AWS)."""
    import subprocess
    import sys

    import requests
    from pyarrow import fs as pafs

    from tests._helpers import wait_until

    root = tmp_path_factory.mktemp("s3")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true",  # no probe of 169.254.169.254 for credentials
                      TEXTSERVE_MODEL_CACHE=str(root / "model-cache"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    port = free_port()
    with open(root / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"http://{endpoint}/", timeout=1).status_code == 200
        except requests.RequestException:
            return False
    try:
        wait_until(up, timeout=60, what=f"moto S3 server on {endpoint}")
        s3, _ = pafs.FileSystem.from_uri(f"s3://textserve?endpoint_override={endpoint}&scheme=http"
                                         "&allow_bucket_creation=true")
        s3.create_dir("textserve")
        yield {"endpoint": endpoint, "bucket": "textserve",
               "uri": lambda prefix: f"s3://textserve/{prefix}?endpoint_override={endpoint}&scheme=http"}
    finally:
        proc.terminate()  # by PID: the server this fixture started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory):
    from tests._helpers import train_quick_model

    store = str(tmp_path_factory.mktemp("store"))
    # The fast lane's tests take the model's shape and its answers to plain commands, not its
    # accuracy: 4 epochs there (seconds), 10 for the apps the integration tests teach and measure.
    train_quick_model(store, epochs=4 if FAST_LANE else 10)
    return store


@pytest.fixture(scope="session")
def base_url(ray_cluster, trained_store):
    """The app served once per test run on a free port of 127.0.0.1 (stopped with Ray)."""
    from ray import serve

    from tests._helpers import deploy, http_ok, wait_until

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30})
    url = f"http://127.0.0.1:{port}"
    deploy(trained_store)

    wait_until(lambda: http_ok(f"{url}/healthz"), timeout=120, what="/healthz 200")
    return url


@pytest.fixture(scope="session")
def hostile_app(ray_cluster, base_url, trained_store, tmp_path_factory):
    """An app with online learning of its own for the security and fuzz tests (fuzzed feedback
    must not reach the learning tests' model): 2 Classifier replicas, its own store copy and
    feedback log. Deployed once; its modules run last (_LAST_MODULES)."""
    import shutil

    from ray import serve

    from tests._helpers import deploy_online, http_ok, wait_until

    root = tmp_path_factory.mktemp("hostile")
    store, state = str(root / "store"), str(root / "state")
    shutil.copytree(trained_store, store)
    deploy_online(store, state, name="hostile")
    url = f"{base_url}/hostile"
    wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="hostile app")
    yield url
    serve.delete("hostile")
