"""A multi-node Ray on this machine, run by tests/test_cluster.py in a process of its own.

Nodes: a head with `learner`, two nodes with `serving`, one with `trainer` (1 CPU each), each with
a working folder of its own (HOME, TMPDIR and the model cache point into it). The only storage
they share is the S3 server (the test's moto): the model store and Ray Train's checkpoints, both
plain s3:// URIs found through AWS_ENDPOINT_URL. The learner's feedback log stays on the head's
folder: the learner is pinned to the head, and restarted there; a learner that may restart on
another node needs that folder on shared storage (an NFS/EFS mount), as serve_cluster.yaml says.

Deploys cluster/serve_cluster.yaml (one proxy on the head), sends feedback until the learner
snapshots into S3, trains with worker_resources {"trainer": 1} (the checkpoint goes to S3, the
driver publishes it), removes a serving node under traffic, and writes what it saw as JSON.
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

from tests._helpers import FEEDBACK_TOKEN

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


def node_env(folder: Path) -> dict:
    """A node's own working folder: everything a node writes by default lands in it."""
    for sub in ("home", "tmp", "cache"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {"HOME": str(folder / "home"), "TMPDIR": str(folder / "tmp"), "TEXTSERVE_MODEL_CACHE": str(folder / "cache")}


def cached_versions(folder: Path) -> list[str]:
    """Versions in a node's model cache (one subfolder per store)."""
    return sorted(p.name for p in (folder / "cache").glob("*/v[0-9]*"))


def main(local_store: str, work: str, bucket: str, port: int, out: str) -> None:
    from train.store import ModelStore

    work_dir = Path(work)
    store = f"s3://{bucket}/multinode/models"  # endpoint and credentials from the standard AWS variables
    runs = f"s3://{bucket}/multinode/ray_results"
    local = ModelStore(local_store)
    ModelStore(store).publish(local.local_path(local.latest()))  # the base model, published from "outside"
    folders = {name: work_dir / name for name in ("head", "serving0", "serving1", "trainer")}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"learner": 1},
                                                            "env_vars": node_env(folders["head"])})
    serving = [cluster.add_node(num_cpus=1, resources={"serving": 1}, env_vars=node_env(folders[f"serving{i}"]))
               for i in range(2)]
    trainer = cluster.add_node(num_cpus=1, resources={"trainer": 1}, env_vars=node_env(folders["trainer"]))
    ray.init(address=cluster.address, log_to_driver=False)
    report = {"head": cluster.head_node.node_id, "serving": [n.node_id for n in serving], "trainer": trainer.node_id,
              "folders": {name: str(f) for name, f in folders.items()}, "store": store}
    folder_of = {cluster.head_node.node_id: "head", serving[0].node_id: "serving0", serving[1].node_id: "serving1",
                 trainer.node_id: "trainer"}
    state_dir = folders["head"] / "online"
    try:
        cfg = yaml.safe_load((ROOT / "cluster" / "serve_cluster.yaml").read_text())
        cfg["proxy_location"] = "HeadOnly"  # nodes share one address here: one ingress port
        cfg["http_options"].update(host="127.0.0.1", port=port)
        app = cfg["applications"][0]
        app["args"]["model_store"] = store
        app["args"]["learner"]["state_dir"] = str(state_dir)  # the head's own disk (see the module doc)
        app["args"]["learner"]["snapshot_interval_s"] = 2.0
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
        # Each replica loaded the base model from S3 into its own node's cache.
        report["cached_at_start"] = {folder_of[n]: cached_versions(folders[folder_of[n]])
                                     for n in set(report["replica_nodes"] + report["learner_nodes"])}

        from train.data import DataSpec, load_dataset
        from train.job import TrainConfig, run_training

        examples = load_dataset(DataSpec(langs=("en",))).test[:40]
        events = [{"event_id": f"mn-{i}", "text": e.text, "label": e.label} for i, e in enumerate(examples)]
        r = requests.post(f"{url}/v1/feedback", json=events, timeout=60,
                          headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"})
        report["feedback_status"] = r.status_code
        s3 = ModelStore(store)

        def snapshots():
            return [v for v in s3.versions() if s3.metrics(v).get("kind") == "online-snapshot"]
        report["snapshots"] = poll(snapshots, 120, "a learner snapshot in S3")
        report["state_dir_files"] = sorted(p.name for p in state_dir.iterdir())

        outcome = run_training(TrainConfig(size="small", data=DataSpec(langs=("en",)), epochs=1, steps_per_epoch=5,
                                           batch_size=16, cpus_per_worker=0.5, worker_resources={"trainer": 1},
                                           store_uri=store, storage_path=runs))
        report["trained_version"] = outcome.version
        report["trained_uri"] = outcome.uri
        report["train_worker_nodes"] = actor_nodes("RayTrainWorker", alive_only=False)
        report["store_versions"] = s3.versions()
        from pyarrow import fs as pafs

        fs, path = pafs.FileSystem.from_uri(runs)
        report["checkpoint_files_on_s3"] = sum(i.type == pafs.FileType.File
                                               for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))

        victim = next(n for n in serving if n.node_id in report["replica_nodes"])
        cluster.remove_node(victim)
        statuses, deadline = [], time.monotonic() + 12
        while time.monotonic() < deadline:
            try:
                statuses.append(requests.post(f"{url}/v1/predict", json={"text": "turn on the light"}, timeout=10).status_code)
            except requests.RequestException as err:
                statuses.append(type(err).__name__)
        report["removed"] = victim.node_id
        report["statuses_after_removal"] = statuses
        report["replica_nodes_after"] = actor_nodes("ServeReplica:textserve:Classifier")
        report["cached_at_end"] = {name: cached_versions(f) for name, f in folders.items()}
    finally:
        Path(out).write_text(json.dumps(report))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])  # store, work, bucket, port, out
