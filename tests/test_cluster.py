"""Cluster files pass Ray's own validation offline; Serve configs pass Serve's schema and ours;
a multi-node Ray on this machine places each role on its nodes and keeps serving without one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.check import check_file, check_serve_config
from tests.conftest import free_port

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RAY_UP_FILES = ["aws.yaml", "onprem.yaml"]
SERVE_FILES = ["serve_local.yaml", "serve_cluster.yaml", "kuberay.yaml"]


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_files_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = {**config, "max_worker": 3}  # a typo Ray's schema must reject
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(copy.deepcopy(broken)))


def test_aws_roles_are_pinned_by_node_type():
    types = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    assert types["gpu_trainer"]["min_workers"] == 0 and types["gpu_trainer"]["resources"] == {"trainer": 1}
    assert types["cpu_serving"]["min_workers"] >= 1 and types["cpu_serving"]["resources"] == {"serving": 1}
    assert types["head"]["resources"] == {"learner": 1}


@pytest.mark.parametrize("name", SERVE_FILES)
def test_serve_configs_pass_serves_schema_and_ours(name):
    assert check_file(CLUSTER / name) == []


@pytest.mark.parametrize("path, value, message", [
    (("applications", 0, "deployments", 0, "autoscaling_config", "max_replica"), 3, "autoscaling_config.max_replica: unknown key"),
    (("applications", 0, "deployments", 0, "ray_actor_options", "num_cpu"), 1, "ray_actor_options.num_cpu: unknown key"),
    (("applications", 0, "args", "max_text"), 9, "args: max_text: unknown key"),
    (("applications", 0, "args", "learner", "publish_interval"), 1, "args: learner.publish_interval: unknown key"),
    (("applications", 0, "deployments", 0, "user_config", "max_batchsize"), 8, "user_config: max_batchsize: unknown key"),
    (("http_options", "prot"), 80, "http_options.prot: unknown key"),
])
def test_typos_that_serve_accepts_are_rejected_with_the_key_named(path, value, message):
    config = yaml.safe_load((CLUSTER / "serve_local.yaml").read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = check_serve_config(config, "serve_local.yaml")
    assert any(message in p for p in problems), problems


@pytest.mark.cluster
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("TEXTSERVE_CLUSTER_TEST") != "1",
                    reason="multi-node (four raylets on this machine, ~1.5 min): make test-cluster (TEXTSERVE_CLUSTER_TEST=1)")
def test_multinode_roles_and_serving_without_a_node(trained_store, s3_server, tmp_path):
    """Each node has a folder of its own; only the S3 store (and Ray Train's checkpoints on S3) are
    shared. The learner's feedback log is on the head's folder: it needs shared storage only where
    the learner may restart on another node (see tests/multinode_scenario.py)."""
    out = tmp_path / "report.json"
    from serve.haproxy_cleanup import haproxy_pids
    from tests._helpers import FEEDBACK_TOKEN, stop_stray_haproxy

    env = {**os.environ, "PYTHONPATH": str(CLUSTER.parent), "TEXTSERVE_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
           "AWS_ENDPOINT_URL": f"http://{s3_server['endpoint']}"}  # the standard variable, not URI options
    env.pop("TEXTSERVE_MODEL_CACHE", None)  # each node sets its own
    before = haproxy_pids()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("multinode_scenario.py")), trained_store,
             str(tmp_path / "nodes"), s3_server["bucket"], str(free_port()), str(out)],
            cwd=CLUSTER.parent, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop_stray_haproxy(before)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert proc.returncode == 0, (r, proc.stderr[-3000:])
    assert len(r["replica_nodes"]) == 2 and set(r["replica_nodes"]) <= set(r["serving"])
    assert r["learner_nodes"] == [r["head"]]
    # every node that runs a replica or the learner loaded v1 from S3 into its own folder
    assert r["cached_at_start"] and all(v == ["v000001"] for v in r["cached_at_start"].values()), r["cached_at_start"]
    assert r["cached_at_end"]["trainer"] == []  # training needs no model from the store
    assert r["feedback_status"] == 202 and r["snapshots"], r  # the learner snapshotted into S3
    assert r["state_dir_files"]  # the feedback log and learner state: on the head's own folder
    assert r["train_worker_nodes"] and set(r["train_worker_nodes"]) == {r["trainer"]}
    assert r["trained_version"] in r["store_versions"] and r["trained_uri"].startswith(r["store"])
    assert r["checkpoint_files_on_s3"] > 0  # the trainer node's checkpoint reached the driver through S3
    statuses = r["statuses_after_removal"]
    assert statuses.count(200) >= 0.9 * len(statuses) and statuses[-20:] == [200] * 20, statuses
    assert set(r["replica_nodes_after"]) <= set(r["serving"]) - {r["removed"]}
