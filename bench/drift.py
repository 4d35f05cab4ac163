"""python -m bench drift: learn a new language online without forgetting the old one.

End to end on this machine: train an English-only `small` base with `python -m train` into a
temp store (or take `--store`), start the app as shipped (cluster/serve_local.yaml: two
replicas, the online learner) on a copy of it, and measure through HTTP /v1/predict the
English test split the base recorded (its DataSpec, so the grouped split when it trained on
one) and the Korean test split. Then stream the Korean training split as feedback events, wait
until the learner has applied all of them, finished its follow-up rounds and every replica
serves its final version (same lineage, version and weights digest), and measure both again.
Writes OUT.json, OUT.md and OUT.png (accuracy of both languages over the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from online_learning.send import send
from serve.process import RunningServe, local_config
from train.data import DataSpec, load_dataset, spec_from_record

# The target: Korean test accuracy at least KOREAN_TARGET after the stream, English test accuracy at
# most ENGLISH_MAX_DROP below its value before it.
ENGLISH_MAX_DROP = 0.01
KOREAN_TARGET = 0.85


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_base(store: str, work: Path, epochs: int | None) -> None:
    """The real training path: `python -m train` (Ray Train, its own local Ray) into `store`."""
    cmd = [sys.executable, "-m", "train", "--size", "small", "--langs", "en", "--store", store,
           "--storage-path", str(work / "ray_results")]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    print("training the English base:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def base_spec(store: str) -> DataSpec:
    """The data the store's newest version was trained on (metrics.json), as a DataSpec."""
    from train.store import ModelStore

    s = ModelStore(store)
    data = s.metrics(s.versions()[-1])["data"]
    return spec_from_record(data)


def served_accuracy(url: str, examples, per_request: int = 64) -> tuple[float, set]:
    """Share of `examples` the app answers with their label, over HTTP; and the versions that answered."""
    correct, versions = 0, set()
    with requests.Session() as http:
        for start in range(0, len(examples), per_request):
            chunk = examples[start : start + per_request]
            r = http.post(f"{url}/v1/predict", json={"texts": [e.text for e in chunk]}, timeout=60)
            r.raise_for_status()
            preds = r.json()["predictions"]
            versions |= {p["model_version"] for p in preds}
            correct += sum(p["label"] == e.label for p, e in zip(preds, chunk))
    return correct / len(examples), versions


def learner_status(url: str, token: str) -> dict:
    try:
        body = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    except (requests.RequestException, ValueError) as err:
        return {"error": repr(err)}
    return body.get("learner") or {"error": body}


def settled(url: str, token: str, last_offset: int, replicas: int) -> dict | None:
    """The learner's status once it has applied every event up to `last_offset`, has no
    follow-up rounds left (it publishes nothing more), and every live replica reports exactly
    its (lineage, version, digest): digests each replica computed from the weights it holds."""
    s = learner_status(url, token)
    if s.get("replaying") or s.get("applied_offset", -1) < last_offset or s.get("followups_left", 1) > 0:
        return None
    live = [r for r in s.get("replicas", {}).values() if time.time() - r["reported_at"] < 5]
    want = (s.get("lineage"), s.get("version"), s.get("digest"))
    ok = s.get("digest") and len(live) >= replicas and all((r["lineage"], r["version"], r["digest"]) == want
                                                          for r in live)
    return s if ok else None


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")


def run(store: str | None, epochs: int | None, timeout_s: float, learner: dict) -> dict:
    token = secrets.token_urlsafe(16)
    os.environ["TEXTSERVE_FEEDBACK_TOKEN"] = token
    work = Path(tempfile.mkdtemp(prefix="drift-"))
    report: dict = {"learner_settings": learner}
    try:
        started = time.monotonic()
        if store is None:
            train_base(str(work / "store"), work, epochs)
            report["train_wall_s"] = time.monotonic() - started
        else:
            shutil.copytree(store, work / "store")  # the learner writes snapshots: keep the source clean
        spec = base_spec(str(work / "store"))
        if spec.path or tuple(spec.langs) != ("en",):
            raise SystemExit(f"error: the drift scenario needs an English-only base on the bundled data; the store's "
                             f"newest version was trained on {spec.path or ','.join(spec.langs)}")
        korean = load_dataset(dataclasses.replace(spec, langs=("ko",)))  # same split mode and seed
        en, ko, ko_test = load_dataset(spec).test, korean.train, korean.test
        report["base_data"] = {k: v for k, v in vars(spec).items() if not k.startswith("_")}
        report["sizes"] = {"english_test": len(en), "korean_feedback_events": len(ko), "korean_test": len(ko_test)}

        config = local_config(str(work / "store"), port=free_port())
        app_cfg = config["applications"][0]
        app_cfg["args"]["learner"] = {**app_cfg["args"]["learner"], "state_dir": str(work / "state"), **learner}
        replicas = app_cfg["deployments"][0]["autoscaling_config"]["min_replicas"]
        with RunningServe(config, name="drift") as app:
            wait_for(lambda: settled(app.url, token, -1, replicas), 120, "replicas on the learner's first version")
            report["before"] = {"english": served_accuracy(app.url, en)[0], "korean": served_accuracy(app.url, ko_test)[0]}
            print(f"before: English {report['before']['english']:.4f}, Korean {report['before']['korean']:.4f}",
                  flush=True)

            trace, stop = [], threading.Event()
            t0 = time.monotonic()

            def sample():  # accuracy of both languages over the run, for the plot
                while not stop.wait(4.0):
                    try:
                        e, k = served_accuracy(app.url, en)[0], served_accuracy(app.url, ko_test)[0]
                    except requests.RequestException:
                        continue
                    trace.append({"t_s": time.monotonic() - t0, "english": e, "korean": k})

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            events = [{"event_id": f"drift-ko-{i}", "text": e.text, "label": e.label} for i, e in enumerate(ko)]
            summary = send(app.url, events, token, batch=128, progress=False)
            acked = time.monotonic()
            if summary["failed"]:
                raise RuntimeError(f"feedback refused: {summary['errors'][:3]}")
            last = learner_status(app.url, token)["log_length"] - 1
            final = wait_for(lambda: settled(app.url, token, last, replicas), timeout_s,
                             "every replica on the learner's final version")
            converged = time.monotonic()
            stop.set()
            sampler.join()
            en_after, versions = served_accuracy(app.url, en)
            ko_after, ko_versions = served_accuracy(app.url, ko_test)
            report["after"] = {"english": en_after, "korean": ko_after, "versions": sorted(versions | ko_versions)}
            rounds = [h for h in final["history"] if h.get("events") and not h.get("replay")]
            report["stream"] = {
                "accepted": summary["accepted"], "send_s": acked - t0, "ack_to_converged_s": converged - acked,
                "final_version": final["version"], "publishes": sum(1 for h in final["history"] if h.get("published")),
                "held_back": final["held_back"], "repairs": sum(h.get("repairs", 0) for h in rounds),
                "history_tail": final["history"][-12:]}
            report["trace"] = trace + [{"t_s": converged - t0, "english": en_after, "korean": ko_after}]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, a = report["before"], report["after"]
    report["english_drop"] = b["english"] - a["english"]
    report["target_met"] = a["korean"] >= KOREAN_TARGET and report["english_drop"] <= ENGLISH_MAX_DROP + 1e-9
    return report


def markdown(r: dict, command: str, png: str = "DRIFT.png") -> str:
    b, a, s = r["before"], r["after"], r["stream"]
    data = r["base_data"]
    lines = [
        "# Drift: an English base learns Korean from feedback, online", "",
        f"Command: `{command}`  ",
        "Machine: 2-core VM; the app as shipped (cluster/serve_local.yaml: 2 Classifier replicas, the online "
        f"learner{', overrides ' + json.dumps(r['learner_settings']) if r['learner_settings'] else ''}); "
        "accuracies measured through HTTP `/v1/predict`.", "",
        f"Base: `small`, English only, data {json.dumps({k: data[k] for k in ('langs', 'seed') if k in data})}"
        + (f", split `{data['split']}`" if "split" in data else "") + (
            f", trained in {r['train_wall_s']:.0f} s" if "train_wall_s" in r else "") + ".", "",
        "| test split | examples | before the stream | after | change |", "|---|---|---|---|---|",
        f"| English (the base's) | {r['sizes']['english_test']} | {b['english']:.4f} | {a['english']:.4f} | "
        f"{a['english'] - b['english']:+.4f} |",
        f"| Korean | {r['sizes']['korean_test']} | {b['korean']:.4f} | {a['korean']:.4f} | "
        f"{a['korean'] - b['korean']:+.4f} |", "",
        f"Stream: {s['accepted']} Korean feedback events (the Korean training split) sent in {s['send_s']:.1f} s; "
        f"last acknowledgement -> every replica on the learner's final version v{s['final_version']}: "
        f"{s['ack_to_converged_s']:.1f} s. Publishes {s['publishes']}, candidates held back {s['held_back']}, "
        f"base repair passes {s['repairs']}.", "",
        f"Target: Korean >= {KOREAN_TARGET}, English at most {ENGLISH_MAX_DROP * 100:.0f} point below "
        f"before: **{'met' if r['target_met'] else 'NOT met'}** (English change {-r['english_drop'] * 100:+.2f} "
        "points).", "",
        f"![accuracy of both languages over the run]({png})", "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [0.0] + [p["t_s"] for p in r["trace"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for lang in ("english", "korean"):
        ax.plot(t, [r["before"][lang]] + [p[lang] for p in r["trace"]], marker="o", label=f"{lang} test")
    ax.axvline(r["stream"]["send_s"], color="grey", linestyle="--", label="last event acknowledged")
    ax.set_xlabel("seconds since the stream started")
    ax.set_ylabel("accuracy served over HTTP")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title("English base, Korean feedback stream")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="take this store's newest version as the English base (copied; left "
                   "unchanged) instead of training one")
    p.add_argument("--epochs", type=int, help="epochs for the base (default: python -m train's)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the replicas to converge")
    p.add_argument("--learner", type=json.loads, default={}, metavar="JSON",
                   help='learner setting overrides, e.g. \'{"base_replay_ratio": 2.0}\'')
    p.add_argument("--out", default="docs/DRIFT")
    a = p.parse_args(argv)
    report = run(a.store, a.epochs, a.timeout, a.learner)
    command = "python -m bench drift " + " ".join(argv if argv is not None else sys.argv[2:])
    Path(a.out + ".json").write_text(json.dumps(report, indent=2))
    Path(a.out + ".md").write_text(markdown(report, command.strip(), Path(a.out).name + ".png"))
    plot(report, a.out + ".png")
    print(Path(a.out + ".md").read_text())
    return 0 if report["target_met"] else 1
