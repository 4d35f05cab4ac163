"""The CNN family, with `python -m train`'s default features (words + char 2/3-grams), through
the whole pipeline: trained by the real Ray Train job, served, taught online (lazy Adam on the
embedding, deltas to the replicas), and fine-tuned into a CNN with the same features again.

The LSTM family takes the same path in test_online_learning.py and test_lifecycle.py; this is
one economical end-to-end run for the other family on a tiny data file.
"""

from __future__ import annotations

import pytest
import requests

from tests._helpers import FEEDBACK_TOKEN, deploy_online, http_ok, trained_dir, wait_until, write_jsonl
from train.data import DataSpec
from train.job import DEFAULT_CHAR_NGRAMS, ArchMismatchError, TrainConfig, run_training
from train.store import ModelStore

AUTH = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
THINGS = ["lamp", "fan", "heater", "radio", "kettle", "tv", "light", "plug", "pump", "heater in the hall"]
PROBE = "brighten everything"  # words the base data never had


def tiny_rows() -> list[dict]:
    rows = []
    for i, thing in enumerate(THINGS * 3):
        rows += [{"text": f"please switch on the {thing} {i}", "label": "on"},
                 {"text": f"turn the {thing} off now {i}", "label": "off"},
                 {"text": f"what is the weather like in town {i}", "label": "weather"}]
    return rows


def predict(url: str, text: str) -> dict:
    r = requests.post(f"{url}/v1/predict", json={"text": text}, timeout=30)
    r.raise_for_status()
    return r.json()


def learner(url: str) -> dict:
    try:
        return requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
    except (requests.RequestException, ValueError) as err:
        return {"error": repr(err)}


def test_cnn_trains_serves_learns_online_and_fine_tunes(ray_cluster, base_url, trained_store, tmp_path, capsys):
    from ray import serve

    from train.__main__ import main as train_main  # `python -m train`, in this process

    store, state = str(tmp_path / "store"), str(tmp_path / "state")
    data = DataSpec(path=str(write_jsonl(tmp_path / "tiny.jsonl", tiny_rows())))
    common = dict(size="small", data=data, batch_size=16, cpus_per_worker=0.25, store_uri=store,
                  storage_path=str(tmp_path / "runs"))
    base = run_training(TrainConfig(arch="cnn", epochs=8, **common))
    assert base.metrics["arch"] == "cnn" and ModelStore(store).load(base.version).arch == "cnn"
    assert ModelStore(store).load(base.version).size.char_ngrams == DEFAULT_CHAR_NGRAMS

    deploy_online(store, state, name="cnn", classifier_replicas=1)
    url = f"{base_url}/cnn"
    try:
        wait_until(lambda: http_ok(f"{url}/healthz"), timeout=180, what="cnn app")
        assert learner(url)["arch"] == "cnn"
        before = predict(url, PROBE)
        target = next(label for label in ("weather", "off", "on") if label != before["label"])
        events = [{"event_id": f"cnn-{i}", "text": f"{PROBE} {suffix}", "label": target}
                  for i, suffix in enumerate(["", "please", "now", "at once", "for me", "today"] * 5)]
        r = requests.post(f"{url}/v1/feedback", json=events, headers=AUTH, timeout=30)
        assert r.status_code == 202 and r.json()["accepted"] == len(events)

        def learned():
            answer = predict(url, PROBE)
            return answer["label"] == target and answer["model_version"] > before["model_version"] and answer
        wait_until(learned, timeout=120, interval=0.5, what=f"served answer to {PROBE!r} becomes {target}")

        def converged():  # the replica holds the learner's published weights, digest checked by it
            s = learner(url).get("learner") or {}
            live = list(s.get("replicas", {}).values())
            return live and all((r["lineage"], r["version"], r["digest"]) == (s["lineage"], s["version"], s["digest"])
                                for r in live) and s
        status = wait_until(converged, timeout=60, what="replica on the learner's version")
        published = [h for h in status["history"] if h.get("published") and h.get("rows")]
        full_bytes = 4 * base.metrics["parameters"]
        assert published and all(0 < h["bytes"] < full_bytes / 10 for h in published), published  # deltas

        # Fine-tune: another family is refused (the CLI says so before Ray starts); the base's is kept.
        with pytest.raises(ArchMismatchError, match=r"a cnn model; --arch lstm cannot start from its weights"):
            run_training(TrainConfig(arch="lstm", epochs=1, fine_tune=True, feedback_dir=state, **common))
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as patch:  # a refusal that regressed must not train here
            import train.job

            patch.setattr(train.job, "_fit_and_publish", lambda *a, **k: pytest.fail("the refused fine-tune trained"))
            code = train_main(["--fine-tune", "--arch", "lstm", "--store", store, "--feedback-dir", state,
                               "--storage-path", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == 2 and "a cnn model; --arch lstm cannot start" in err, err[-2000:]
        tuned = run_training(TrainConfig(epochs=3, fine_tune=True, feedback_dir=state, **common))
        assert tuned.metrics["arch"] == "cnn" and tuned.metrics["kind"] == "fine-tune"
        assert ModelStore(store).load(tuned.version).arch == "cnn"
        assert ModelStore(store).load(tuned.version).size == ModelStore(store).load(base.version).size  # features kept

        def rebased():
            s = (converged() or {})
            return s.get("base_version") == tuned.version and s.get("pending") == 0 and s
        wait_until(rebased, timeout=120, what="learner rebased on the fine-tuned CNN")
        assert predict(url, PROBE)["label"] == target  # the fine-tune trained on the logged feedback

        # A plain retrain into another family and label set (an English LSTM: the suite's base
        # model, published as a retrain publishes its folder) while the CNN serves: the learner
        # adopts it and the replica, whose CNN cannot take LSTM weights, loads the new base from
        # the store and ends on the learner's exact weights, answering English intents.
        retrained = ModelStore(store).publish(trained_dir(trained_store))
        assert retrained > tuned.version

        def switched():
            s = (converged() or {})
            return s.get("base_version") == retrained and s.get("pending") == 0 and s
        wait_until(switched, timeout=180, what="replica switched to the LSTM retrain")
        info = learner(url)
        assert info["arch"] == "lstm" and "HassTurnOn" in info["labels"], {k: info.get(k) for k in ("arch", "labels")}
        assert predict(url, "turn on the lights in the kitchen")["label"] == "HassTurnOn"
    finally:
        serve.delete("cnn")
