"""The model store on a real S3 API (moto's server on 127.0.0.1): publish/load, racing publishers,
a publish killed halfway, the bounded cache, the train CLI, and the whole serve -> learn ->
fine-tune -> rebase cycle through the app."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, trained_dir, wait_until, write_jsonl
from train.store import ModelStore, VersionTaken

ROOT = Path(__file__).resolve().parent.parent


def fake_model(tmp_path: Path, files: int = 4, size: int = 20_000) -> Path:
    d = tmp_path / "fake-model"
    d.mkdir()
    (d / "metrics.json").write_text('{"kind": "test"}')
    for i in range(files):
        (d / f"part{i}.bin").write_bytes(os.urandom(size))
    return d


def stored_sizes(store: ModelStore, version: int) -> dict:
    """Every model file under the version's prefix with its size, as the server lists them."""
    from pyarrow import fs as pafs

    prefix = store._path(version)
    infos = store._fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pafs.FileType.File
            and not i.path[len(prefix) + 1:].startswith(("_claims/", "_COMMITTED"))}


def test_round_trip_with_the_real_model_and_uri_options(s3_server, trained_store, tmp_path):
    uri = s3_server["uri"]("roundtrip")
    store = ModelStore(uri, cache_dir=tmp_path / "cache")
    assert store.versions() == [] and not store.is_local
    assert store.publish(trained_dir(trained_store)) == 1
    assert store.version_uri(1) == f"s3://textserve/roundtrip/v000001?endpoint_override={s3_server['endpoint']}&scheme=http"
    from pyarrow import fs as pafs

    s3, path = pafs.FileSystem.from_uri(store.version_uri(1))  # the version URI opens the version
    assert s3.get_file_info(f"{path}/metrics.json").type == pafs.FileType.File
    record = store.commit_record(1)
    assert record["files"] == stored_sizes(store, 1) and "metrics.json" in record["files"]

    texts = ["turn on the kitchen light", "what time is it"]
    loaded = store.load()
    expected = ModelStore(trained_store).load()
    assert loaded.version == 1 and loaded.labels == expected.labels
    np.testing.assert_allclose(loaded.predict(texts), expected.predict(texts), rtol=1e-6)

    weights = next(p for p in store.local_path(1).iterdir() if p.suffix == ".h5")
    before = weights.stat()
    assert store.load(1).version == 1  # cached: not downloaded again
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.local_path(1).parent.parent == (tmp_path / "cache").resolve()


PUBLISHER = textwrap.dedent("""
    import json, os, sys, time
    from train.store import ModelStore
    uri, model, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = ModelStore(uri)
    open(f"{go}.ready.{os.getpid()}", "w").close()  # imported and connected: the test waits for both
    while not os.path.exists(go):
        time.sleep(0.005)
    print(json.dumps([store.publish(model) for _ in range(n)]))
""")


def test_two_concurrent_publishers_get_distinct_complete_versions(s3_server, tmp_path):
    uri = s3_server["uri"]("race")
    model, go = fake_model(tmp_path), tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, uri, str(model), str(go), "3"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    wait_until(lambda: len(list(tmp_path.glob("go.ready.*"))) == 2 or any(p.poll() is not None for p in procs),
               timeout=120, what="both publishers ready")
    go.touch()
    got = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        got.append(json.loads(out))
    store = ModelStore(uri)
    assert sorted(got[0] + got[1]) == store.versions() == list(range(1, 7)), got
    want = {p.name: p.stat().st_size for p in model.iterdir()}
    for v in store.versions():
        assert store.commit_record(v)["files"] == want == stored_sizes(store, v)


def test_reservations_and_pins_on_s3(s3_server, tmp_path):
    """A publisher taking the next number goes above every reservation (the learner numbers
    versions it has not stored); gc never deletes a pinned version (a fine-tune's base)."""
    store = ModelStore(s3_server["uri"]("reserve"))
    model = fake_model(tmp_path)
    assert store.publish(model) == 1
    store.reserve("online-learner", 40)
    assert store.reserved() == 40 and store.publish(model) == 41  # not 2: the learner may be serving 2..40
    store.pin(1, "fine-tune-test")
    for _ in range(3):
        store.publish(model)
    removed = store.gc(keep_last=1)
    assert 1 not in removed["versions"] and store.versions() == [1, 44]
    store.unpin("fine-tune-test")
    assert store.gc(keep_last=1)["versions"] == [1] and store.versions() == [44]


def test_an_explicit_version_goes_to_one_publisher_only(s3_server, tmp_path):
    store = ModelStore(s3_server["uri"]("explicit"))
    model = fake_model(tmp_path, files=1)
    for version in range(1, 9):
        outcomes, barrier = [], threading.Barrier(2)

        def publish():
            barrier.wait()
            try:
                outcomes.append(ModelStore(store.uri).publish(model, version=version))
            except VersionTaken as err:
                outcomes.append(err)
        threads = [threading.Thread(target=publish) for _ in range(2)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert sum(o == version for o in outcomes) <= 1 and len(outcomes) == 2, outcomes
    with pytest.raises(VersionTaken, match="not above the newest"):
        store.publish(model, version=store.latest())


KILLED = textwrap.dedent("""
    import sys, time
    from train.store import ModelStore
    real_check = ModelStore._check_claim

    def slow_check(self, version, token, written, marker=False):
        # A slow upload: a long pause once a file is complete in the store, before the next one
        # (the publish checks its claim there), so it is killed halfway.
        if written and not marker:
            time.sleep(30)
        return real_check(self, version, token, written, marker)
    ModelStore._check_claim = slow_check
    print(ModelStore(sys.argv[1]).publish(sys.argv[2]), flush=True)
""")


def test_a_publish_killed_halfway_is_never_seen_and_is_collected(s3_server, trained_store, tmp_path):
    uri = s3_server["uri"]("killed")
    store = ModelStore(uri)
    assert store.publish(trained_dir(trained_store)) == 1
    proc = subprocess.Popen([sys.executable, "-c", KILLED, uri, str(trained_dir(trained_store))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, stop = set(), threading.Event()

    def reader():  # a reader polling all along never sees version 2
        while not stop.wait(0.02):
            seen.update(ModelStore(uri).versions())
    t = threading.Thread(target=reader)
    t.start()
    try:
        half = wait_until(lambda: [r for r in store.describe() if r.version == 2 and r.files >= 2], timeout=60,
                          what="v2 half uploaded (claim + one file)")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        t.join(30)
    assert not half[0].committed and seen == {1}
    assert store.versions() == [1] and store.latest() == 1 and store.load().version == 1
    with pytest.raises(FileNotFoundError):
        store.load(2)

    ls = subprocess.run([sys.executable, "-m", "train", "store", "ls", "--store", uri], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "UNCOMMITTED" in ls.stdout, ls.stderr[-2000:]
    assert store.gc(keep_last=5) == {"versions": [], "uncommitted": []}  # within the grace period: kept
    assert store.publish(trained_dir(trained_store)) == 3  # the next publish goes above the half version
    wait_until(lambda: next(r.age_s for r in store.describe() if r.version == 2) > 1.5, timeout=30,
               what="the half version older than the 1 s grace below")
    gc = subprocess.run([sys.executable, "-m", "train", "store", "gc", "--keep-last", "5", "--grace-s", "1",
                         "--store", uri], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr[-2000:]
    assert json.loads(gc.stdout.strip().splitlines()[-1]) == {"versions": [], "uncommitted": [2]}
    assert [r.version for r in store.describe()] == [1, 3] and store.versions() == [1, 3]


def test_the_cache_keeps_the_configured_number_of_versions(s3_server, trained_store, tmp_path):
    uri, cache = s3_server["uri"]("cache"), tmp_path / "cache"
    store = ModelStore(uri, cache_dir=cache, cache_keep=2)
    for _ in range(4):
        store.publish(trained_dir(trained_store))
    on_disk = []
    for v in (1, 2, 3, 4):
        assert store.load(v).version == v
        on_disk.append(sorted(p.name for p in store.cache.root.iterdir() if p.name.startswith("v")))
    assert on_disk == [["v000001"], ["v000001", "v000002"], ["v000002", "v000003"], ["v000003", "v000004"]]
    removed = store.gc(keep_last=1)
    assert removed == {"versions": [1, 2, 3], "uncommitted": []} and store.versions() == [4]
    with pytest.raises(FileNotFoundError):
        store.load(3)  # cached, but gone from the store: not served from the cache


def test_train_cli_publishes_to_s3(ray_cluster, s3_server, tmp_path, capsys):
    """`python -m train --store s3://... --char-ngrams none` (its main, in this process, on the
    suite's Ray: the training worker reads the data and writes checkpoints, the driver publishes
    to S3). Words alone, the option's explicit `none`: the default subword features take the Ray
    Train path in test_cnn_family.py."""
    from train.__main__ import main as train_main

    rows = [{"text": f"please switch {w} lamp {i}", "label": w} for i in range(20) for w in ("on", "off")]
    data = write_jsonl(tmp_path / "tiny.jsonl", rows)
    uri = s3_server["uri"]("cli")
    code = train_main(["--store", uri, "--data", str(data), "--epochs", "2", "--batch-size", "16",
                       "--char-ngrams", "none", "--cpus-per-worker", "0.25", "--storage-path", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    store = ModelStore(uri)
    assert f"published model version 1 -> {store.version_uri(1)}" in out
    loaded = store.load()
    assert loaded.version == 1 and loaded.labels == ["off", "on"]
    metrics = store.metrics(1)
    assert set(metrics) >= {"test_accuracy", "val_accuracy", "samples_per_s", "epoch", "parameters"}, metrics
    assert metrics["samples_per_s"] > 0 and metrics["epoch"] in (1, 2)  # the best validation epoch
    assert loaded.arch == "cnn" and loaded.size.char_ngrams == () and metrics["char_ngrams"] == []
    store.read_file(1, "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert metrics["subword_mix"] is None and config["format"] == 2 and "char_ngrams" not in config["size"]
    assert loaded.metrics["test_accuracy"] == metrics["test_accuracy"]
    assert np.isfinite(loaded.predict(["please switch on lamp 3"])).all()


AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


def test_serve_learn_fine_tune_rebase_on_s3(ray_cluster, base_url, s3_server, trained_store, tmp_path):
    """The app serves from S3, the learner snapshots to S3, a fine-tune on S3 is adopted."""
    from ray import serve

    from train.__main__ import main as train_main
    from train.data import DataSpec, load_dataset

    uri, state = s3_server["uri"]("app"), str(tmp_path / "state")
    store = ModelStore(uri)
    assert store.publish(trained_dir(trained_store)) == 1
    deploy_online(uri, state, name="s3")
    url = f"{base_url}/s3"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="s3 app ready")
        texts = ["turn on the light", "what time is it", "set a timer for five minutes"]
        r = requests.post(f"{url}/v1/predict", json={"texts": texts}, timeout=30)
        assert r.status_code == 200, r.text
        # The learner numbers what it serves itself (a new lineage on v1); the weights are v1's from S3.
        expected = store.load(1)
        probs = expected.predict(texts)
        for answer, p in zip(r.json()["predictions"], probs):
            assert answer["label"] == expected.labels[int(p.argmax())] and abs(answer["score"] - p.max()) < 1e-4

        examples = load_dataset(DataSpec(langs=("en",))).test[:60]
        events = [{"event_id": f"s3-{i}", "text": e.text, "label": e.label} for i, e in enumerate(examples)]
        r = requests.post(f"{url}/v1/feedback", json=events, headers=AUTH, timeout=60)
        assert r.status_code == 202, r.text

        def snapshot():
            return [v for v in store.versions() if v > 1 and store.metrics(v).get("kind") == "online-snapshot"]
        snapshots = wait_until(snapshot, timeout=180, what="a learner snapshot in the S3 store")

        assert train_main(["--fine-tune", "--store", uri, "--feedback-dir", state, "--epochs", "1",
                           "--cpus-per-worker", "0.25", "--storage-path", str(tmp_path / "runs")]) == 0
        tuned = max(v for v in store.versions() if store.metrics(v).get("kind") == "fine-tune")
        assert tuned > max(snapshots)

        def rebased():
            r = requests.post(f"{url}/v1/predict", json={"texts": ["turn on the light"] * 4}, timeout=30)
            return r.status_code == 200 and min(p["model_version"] for p in r.json()["predictions"]) > tuned
        wait_until(rebased, timeout=180, what=f"answers from above the fine-tuned v{tuned}")
        print(f"\nS3 cycle: snapshots {snapshots}, fine-tune v{tuned}, store {store.versions()}")
    finally:
        serve.delete("s3")


def test_a_publish_collected_while_it_uploads_commits_nothing_on_s3(s3_server, tmp_path, monkeypatch):
    from tests.test_store_claims import model_dir, publish_collected_midway
    from train.store import ClaimLost

    uri = s3_server["uri"]("collected")
    outcome, store = publish_collected_midway(uri, model_dir(tmp_path), monkeypatch)
    assert isinstance(outcome[0], ClaimLost), outcome
    assert store.versions() == [] and store.latest() is None
