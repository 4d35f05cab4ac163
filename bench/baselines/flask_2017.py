"""The 2017 architecture: a threaded Flask microservice calling `model.predict` per request.

python -m bench.baselines.flask_2017 --store STORE [--version N] [--port 8001]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_app(store: str, version: int | None):
    import numpy as np
    from flask import Flask, jsonify, request

    from train.store import ModelStore

    loaded = ModelStore(store).load(version)
    model, labels = loaded.model, loaded.labels
    app = Flask("flask_2017")

    @app.post("/v1/predict")
    def predict():
        text = (request.get_json(silent=True) or {}).get("text")
        if not isinstance(text, str) or not text.strip():
            return jsonify(error={"code": "empty_text", "message": "text is required"}), 422
        probs = model.predict(np.array([text], dtype=object), verbose=0)[0]  # as they served it
        best = int(probs.argmax())
        return jsonify(label=labels[best], score=float(probs[best]), model_version=loaded.version)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ready", model_version=loaded.version)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args()
    make_app(a.store, a.version).run(host="127.0.0.1", port=a.port, threaded=True)


if __name__ == "__main__":
    main()
