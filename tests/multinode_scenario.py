"""A multi-node Ray on this machine, run by tests/test_cluster.py in a process of its own.

Nodes: a head with `learner`, two nodes with `serving`, one with `trainer` (1 CPU each). Deploys
cluster/serve_cluster.yaml (store and log pointed at local folders, one proxy on the head),
trains with --worker-resources '{"trainer": 1}', removes a serving node under traffic, and
writes what it saw as JSON for the test to check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray
import requests
import yaml
from ray.cluster_utils import Cluster
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema
from ray.util.state import list_actors

ROOT = Path(__file__).resolve().parent.parent


def poll(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(what)


def actor_nodes(class_name: str, alive_only: bool = True) -> list[str]:
    filters = [("class_name", "=", class_name)] + ([("state", "=", "ALIVE")] if alive_only else [])
    return [a.node_id for a in list_actors(filters=filters, limit=1000)]


def main(store: str, state_dir: str, data_file: str, port: int, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"learner": 1}})
    serving = [cluster.add_node(num_cpus=1, resources={"serving": 1}) for _ in range(2)]
    trainer = cluster.add_node(num_cpus=1, resources={"trainer": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    report = {"head": cluster.head_node.node_id, "serving": [n.node_id for n in serving], "trainer": trainer.node_id}
    try:
        cfg = yaml.safe_load((ROOT / "cluster" / "serve_cluster.yaml").read_text())
        cfg["proxy_location"] = "HeadOnly"  # nodes share one address here: one ingress port
        cfg["http_options"].update(host="127.0.0.1", port=port)
        app = cfg["applications"][0]
        app["args"]["model_store"] = store
        app["args"]["learner"]["state_dir"] = state_dir
        deps = {d["name"]: d for d in app["deployments"]}
        deps["Classifier"]["ray_actor_options"]["num_cpus"] = 0.5  # 1-CPU test nodes
        deps["Classifier"]["autoscaling_config"].update(min_replicas=2, max_replicas=2)
        deps["OnlineLearner"]["ray_actor_options"]["num_cpus"] = 0.5
        schema = ServeDeploySchema.model_validate(cfg)
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location)
        client.deploy_apps(schema, _blocking=False)
        url = f"http://127.0.0.1:{port}"
        poll(lambda: requests.get(f"{url}/healthz", timeout=2).status_code == 200, 240, "app ready")
        poll(lambda: len(actor_nodes("ServeReplica:textserve:Classifier")) == 2, 120, "2 replicas")
        report["replica_nodes"] = actor_nodes("ServeReplica:textserve:Classifier")
        report["learner_nodes"] = actor_nodes("ServeReplica:textserve:OnlineLearner")

        from train.data import DataSpec
        from train.job import TrainConfig, run_training

        outcome = run_training(TrainConfig(size="small", data=DataSpec(path=data_file), epochs=1, batch_size=16,
                                           cpus_per_worker=0.5, worker_resources={"trainer": 1},
                                           store_uri=str(Path(store).parent / "trained"),
                                           storage_path=str(Path(store).parent / "runs")))
        report["trained_version"] = outcome.version
        report["train_worker_nodes"] = actor_nodes("RayTrainWorker", alive_only=False)

        victim = next(n for n in serving if n.node_id in report["replica_nodes"])
        cluster.remove_node(victim)
        statuses, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                statuses.append(requests.post(f"{url}/v1/predict", json={"text": "turn on the light"}, timeout=10).status_code)
            except requests.RequestException as err:
                statuses.append(type(err).__name__)
        report["removed"] = victim.node_id
        report["statuses_after_removal"] = statuses
        report["replica_nodes_after"] = actor_nodes("ServeReplica:textserve:Classifier")
    finally:
        Path(out).write_text(json.dumps(report))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
