"""`make demo`: the main job end to end on the embedded default (local Ray, local store, bundled data).

1. trains the small model on English intents with Ray Train, publishes it to ./artifacts/models;
2. starts the Serve app from cluster/serve_local.yaml (fast ingress, online learner) in its own process;
3. asks it English and Korean questions over HTTP: it knows no Korean yet;
4. streams Korean feedback events (the bundled Korean training split) to /v1/feedback and shows
   the served answers changing as the learner publishes new versions.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

import requests

ENGLISH = ["turn on the kitchen light", "what's the temperature in the living room", "pause the music"]


def ask(url: str, title: str, queries: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for text, expected in queries:
        body = requests.post(f"{url}/v1/predict", json={"text": text}, timeout=10).json()
        mark = "" if not expected else ("  (right)" if body["label"] == expected else f"  (wrong: {expected})")
        print(f"  {text:42} -> {body['label']:26} score {body['score']:.3f}  model v{body['model_version']}{mark}")


def korean_accuracy(url: str, examples) -> tuple[float, int]:
    correct, versions = 0, set()
    for start in range(0, len(examples), 64):  # the config's max_texts per request
        chunk = examples[start : start + 64]
        r = requests.post(f"{url}/v1/predict", json={"texts": [e.text for e in chunk]}, timeout=30)
        r.raise_for_status()
        preds = r.json()["predictions"]
        correct += sum(p["label"] == e.label for p, e in zip(preds, chunk))
        versions |= {p["model_version"] for p in preds}
    return correct / len(examples), min(versions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--skip-train", action="store_true", help="serve the newest model already in the store")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    a = p.parse_args(argv)
    if not a.skip_train:
        print("== 1/4 train: Ray Train, small model, bundled English intents ==", flush=True)
        from train.__main__ import main as train_main

        if rc := train_main(["--size", "small", "--langs", "en"]):
            return rc
    from online_learning.send import send
    from serve.process import RunningServe, local_config
    from train.data import DataSpec, load_dataset

    token = os.environ.setdefault("TEXTSERVE_FEEDBACK_TOKEN", secrets.token_urlsafe(16))
    config = local_config(port=a.port)
    state_dir = os.path.abspath(f"artifacts/demo/online-{time.strftime('%Y%m%d-%H%M%S')}")
    config["applications"][0]["args"]["learner"]["state_dir"] = state_dir  # a fresh feedback log
    print(f"\n== 2/4 serve: cluster/serve_local.yaml on 127.0.0.1:{a.port} (fast ingress, online learner) ==", flush=True)
    with RunningServe(config, name="demo") as app:
        print(f"serving at {app.url}  (OpenAPI docs: {app.url}/docs; feedback log in {state_dir})")
        ko = load_dataset(DataSpec(langs=("ko",)))
        seen: dict[str, str] = {}
        for e in ko.test:  # three held-out Korean sentences with different intents
            if e.label not in seen.values() and len(seen) < 3:
                seen[e.text] = e.label
        queries = [(t, "") for t in ENGLISH] + list(seen.items())
        ask(app.url, "== 3/4 query: POST /v1/predict (the model was trained on English only) ==", queries)
        before, version = korean_accuracy(app.url, ko.test)
        print(f"\n  served accuracy on the Korean test split: {before:.3f} (model v{version})")
        print(f"\n== 4/4 learn online: {len(ko.train)} Korean feedback events -> POST /v1/feedback ==", flush=True)
        events = [{"event_id": f"demo-ko-{i}", "text": e.text, "label": e.label} for i, e in enumerate(ko.train)]
        summary = send(app.url, events, token, batch=128)
        acked = time.monotonic()
        print(f"  accepted {summary['accepted']}, duplicates {summary['duplicates']}, failed {summary['failed']}")
        deadline, acc = acked + 120, before
        while time.monotonic() < deadline:
            acc, version = korean_accuracy(app.url, ko.test)
            print(f"  {time.monotonic() - acked:5.1f} s after the last ack: Korean accuracy {acc:.3f} (model v{version})")
            if acc >= 0.8:
                break
            time.sleep(1)
        ask(app.url, "  the same questions now:", queries)
        learner = requests.get(f"{app.url}/v1/model", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["learner"]
        pub = [h for h in learner["history"] if h["published"]]
        print(f"\n  learner v{learner['version']}: {len(pub)} publishes, {learner['held_back']} held back, "
              f"largest publish {max((h['bytes'] for h in pub), default=0) / 1e3:.0f} kB, staleness {learner['staleness_s']:.1f} s")
        for h in [h for h in learner["history"] if h.get("reason")][-5:]:  # why, when something was held back
            print(f"    held back at log offset {h['log_offset']}: {h['reason']}")
    print("\nstopped the app. Serve it yourself: python -m serve run   (see README)")
    return 0 if acc >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
