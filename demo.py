"""`make demo`: the main job end to end on the embedded default (local Ray, local store, bundled data).

1. trains the small model on English + Korean intents with Ray Train, publishes it to ./artifacts/models;
2. starts the Serve app from cluster/serve_local.yaml (fast ingress) in its own process;
3. sends real English and Korean queries over HTTP and prints the answers; then stops the app.
"""

from __future__ import annotations

import argparse
import sys

import requests

QUERIES = [
    "turn on the kitchen light",
    "what's the temperature in the living room",
    "pause the music",
    "set a timer for 5 minutes",
    "거실 조명 켜줘",
    "타이머 취소",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--skip-train", action="store_true", help="serve the newest model already in the store")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    a = p.parse_args(argv)
    if not a.skip_train:
        print("== 1/3 train: Ray Train, small model, bundled English + Korean intents ==", flush=True)
        from train.__main__ import main as train_main

        if rc := train_main(["--size", "small", "--langs", "en,ko"]):
            return rc
    from serve.process import RunningServe, local_config

    print(f"\n== 2/3 serve: serve run cluster/serve_local.yaml on 127.0.0.1:{a.port} (fast ingress) ==", flush=True)
    with RunningServe(local_config(port=a.port), name="demo") as app:
        print(f"serving at {app.url}  (OpenAPI docs: {app.url}/docs; Serve log: {app.log_path})")
        print("\n== 3/3 query: POST /v1/predict ==")
        for text in QUERIES:
            r = requests.post(f"{app.url}/v1/predict", json={"text": text}, timeout=10)
            r.raise_for_status()
            body = r.json()
            print(f"  {text!r:45} -> {body['label']:26} score {body['score']:.3f}  model v{body['model_version']}")
        batch = requests.post(f"{app.url}/v1/predict", json={"texts": QUERIES[:2]}, timeout=10).json()
        print(f"  a list of {len(batch['predictions'])} texts -> {[x['label'] for x in batch['predictions']]}")
        bad = requests.post(f"{app.url}/v1/predict", json={"text": ""}, timeout=10)
        print(f"  an empty text -> HTTP {bad.status_code} {bad.json()}")
    print("\nstopped the app. Serve it yourself: python -m serve run   (see README)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
