"""python -m bench freshness: what online learning costs the served path, and how fresh it is.

Starts the app (fast ingress, online learner) on a model store, then in one run measures:
p99 of /v1/predict under closed-loop load without feedback and while a feedback stream makes the
learner publish; bytes per publish against the full weights; and the time from an event's
acknowledgement until every replica serves a version that includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import multiprocessing
import tempfile
import time
from pathlib import Path

import requests

from bench.cpu_split import CpuSampler
from bench.load import bench_texts, closed_loop
from bench.stats import combine_runs
from online_learning.send import send
from serve.process import RunningServe, local_config
from train.data import DataSpec, load_dataset


def feedback_stream(url: str, token: str, stop, sent, prefix: str = "fresh-", per_request: int = 32,
                    every_s: float = 0.5) -> None:
    """Sends English training sentences as feedback until `stop` is set, counting acknowledged
    events in `sent` (a multiprocessing Value). Runs in its own process: a feedback sender is
    another client, and in the load client's process it would take that client's GIL."""
    examples = load_dataset(DataSpec(langs=("en",))).train
    i = 0
    while not stop.is_set():
        chunk = examples[i % len(examples): i % len(examples) + per_request]
        events = [{"event_id": f"{prefix}{i + k}", "text": e.text, "label": e.label} for k, e in enumerate(chunk)]
        accepted = send(url, events, token, batch=per_request, progress=False)["accepted"]
        with sent.get_lock():
            sent.value += accepted
        i += per_request
        stop.wait(every_s)


def measured_phase(predict: str, users: int, duration_s: float, texts: list[str]) -> dict:
    """One closed-loop phase, with every process's CPU sampled over its middle (all but 1 s at each end)."""
    sampler, usage = CpuSampler().window(1.0, max(1.0, duration_s - 2))
    summary = asyncio.run(closed_loop(predict, users, duration_s, texts)).summary()
    sampler.join()
    summary["cpu_percent"] = {name: round(cpu, 1) for name, cpu in usage.most_common() if cpu >= 1}
    return summary


def time_to_serve(url: str, token: str, n: int, timeout_s: float = 60) -> list[float]:
    lags = []
    for k in range(n):
        event = {"event_id": f"probe-{k}-{secrets.token_hex(4)}", "text": f"turn on lamp {k}", "label": "HassTurnOn"}
        r = requests.post(f"{url}/v1/feedback", json=event, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        acked, offset = time.monotonic(), r.json()["offsets"][0]
        while time.monotonic() - acked < timeout_s:
            live = model_info(url, token)["learner"]["replicas"]
            if live and all(rep["log_offset"] >= offset for rep in live.values()):
                lags.append(time.monotonic() - acked)
                break
            time.sleep(0.05)
    return lags


def publishing_phase(url: str, token: str, predict: str, users: int, duration_s: float, texts: list[str],
                     prefix: str) -> tuple[dict, int]:
    """A measured phase while a feedback stream (its own process) makes the learner publish;
    returns its figures and the events acknowledged."""
    spawn = multiprocessing.get_context("spawn")
    stop, sent = spawn.Event(), spawn.Value("q", 0)
    streamer = spawn.Process(target=feedback_stream, args=(url, token, stop, sent, prefix), daemon=True)
    streamer.start()
    try:
        deadline = time.monotonic() + 60
        while sent.value == 0 and streamer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if sent.value == 0:
            raise RuntimeError("the feedback stream acknowledged nothing in 60 s")
        time.sleep(2)  # the first rounds are under way
        return measured_phase(predict, users, duration_s, texts), sent.value
    finally:
        stop.set()
        streamer.join(timeout=30)
        if streamer.is_alive():
            streamer.kill()


def model_info(url: str, token: str) -> dict:
    """GET /v1/model with the operator token: the replica's details and the learner's status."""
    return requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()


def learner_version(url: str, token: str) -> int:
    return model_info(url, token)["learner"]["version"]


def wait_learner_idle(url: str, token: str, timeout_s: float = 300) -> None:
    """Until the learner has trained everything acknowledged and owes no follow-up round."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = model_info(url, token)["learner"]
        if status.get("pending") == 0 and status.get("followups_left") == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"the learner was still busy after {timeout_s:.0f} s")


def run(store: str, users: int, duration_s: float, replicas: int, learner: dict | None = None, rounds: int = 1) -> dict:
    token = secrets.token_urlsafe(16)
    os.environ["TEXTSERVE_FEEDBACK_TOKEN"] = token
    work = Path(tempfile.mkdtemp(prefix="freshness-"))
    shutil.copytree(store, work / "store")  # the learner writes snapshots: keep the source clean
    config = local_config(str(work / "store"))
    app_cfg = config["applications"][0]
    app_cfg["args"]["learner"].update({**(learner or {}), "state_dir": str(work / "state")})
    dep = app_cfg["deployments"][0]
    dep.pop("autoscaling_config", None)
    dep["num_replicas"] = replicas
    texts = bench_texts()
    report = {"users": users, "duration_s": duration_s, "replicas": replicas, "learner_settings": learner or {},
              "rounds_run": rounds}
    try:
        with RunningServe(config, name="freshness") as app:
            predict = f"{app.url}/v1/predict"
            asyncio.run(closed_loop(predict, 8, 3, texts))
            phases, first_version = [], learner_version(app.url, token)
            for r in range(rounds):
                if r:  # the previous stream's follow-up rounds would land in this round's quiet phase
                    wait_learner_idle(app.url, token)
                quiet = measured_phase(predict, users, duration_s, texts)
                busy, sent = publishing_phase(app.url, token, predict, users, duration_s, texts, f"fresh{r}-")
                phases.append({"without_publishes": quiet, "during_publishes": busy, "feedback_events_sent": sent})
            report["rounds"] = phases
            for key in ("without_publishes", "during_publishes"):  # medians over the rounds (CPU: the first round's)
                report[key] = combine_runs([p[key] for p in phases])
            report["feedback_events_sent"] = sum(p["feedback_events_sent"] for p in phases)
            info = model_info(app.url, token)
            learner = info["learner"]
            pubs = [h for h in learner["history"] if h["published"]]  # the last 50 rounds: bytes sampled there
            report["publishes"] = learner["version"] - first_version  # one number per publish, in one lineage
            report["held_back"] = learner["held_back"]
            report["held_back_reasons"] = [h["reason"] for h in learner["history"] if h.get("reason")]
            report["bytes_per_publish"] = {"mean": sum(h["bytes"] for h in pubs) / max(1, len(pubs)),
                                           "max": max((h["bytes"] for h in pubs), default=0)}
            report["parameters"] = info["metrics"].get("parameters")
            report["full_weights_bytes"] = 4 * (report["parameters"] or 0)
            report["ack_to_all_replicas_s"] = time_to_serve(app.url, token, 10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def markdown(r: dict, command: str) -> str:
    a, b = r["without_publishes"], r["during_publishes"]
    lags = sorted(r["ack_to_all_replicas_s"])
    return "\n".join([
        f"Command: `{command}`  \nMachine: 2-core VM, client and server on it; {r['replicas']} Classifier replica(s), "
        f"{r['users']} closed-loop users, {r['duration_s']:.0f} s per phase; learner settings over the shipped ones: "
        f"{json.dumps(r.get('learner_settings') or {})}\n",
        "| phase | req/s | p50 ms | p99 ms | failed |", "|---|---|---|---|---|",
        f"| no publishes | {a['tps']:.0f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {a['failed']} |",
        f"| feedback stream, learner publishing | {b['tps']:.0f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {b['failed']} |",
        "", *round_lines(r),
        f"Publishes: {r['publishes']} ({r['held_back']} held back{': ' + '; '.join(r.get('held_back_reasons') or []) if r.get('held_back_reasons') else ''}) from {r['feedback_events_sent']} events; bytes per "
        f"publish mean {r['bytes_per_publish']['mean'] / 1e6:.2f} MB, max {r['bytes_per_publish']['max'] / 1e6:.2f} MB, "
        f"vs full weights {r['full_weights_bytes'] / 1e6:.1f} MB ({r['parameters']:,} parameters).",
        "",
        f"Acknowledged -> served by every replica (10 probes): min {lags[0]:.2f} s, median {lags[len(lags) // 2]:.2f} s, "
        f"max {lags[-1]:.2f} s." if lags else "No probe was served in time.",
        "", *cpu_table(a.get("cpu_percent") or {}, b.get("cpu_percent") or {}),
    ])


def paired_ratios(r: dict) -> dict | None:
    """Per round (a quiet phase, then a publishing one, minutes apart): publishing / quiet, TPS and p99."""
    rounds = r.get("rounds") or []
    if len(rounds) < 2:
        return None
    out = {}
    for key in ("tps", "p99_ms"):
        each = [x["during_publishes"][key] / x["without_publishes"][key] for x in rounds]
        out[key] = {"median": statistics.median(each), "min": min(each), "max": max(each), "each": each}
    return out


def round_lines(r: dict) -> list[str]:
    paired = paired_ratios(r)
    if not paired:
        return []
    t, q = paired["tps"], paired["p99_ms"]
    return [f"{len(r['rounds'])} rounds (a quiet phase, then a publishing one; the learner idle again before "
            "each round); figures above are medians over them. Publishing / quiet within each round: TPS "
            f"**{t['median']:.2f}x** median ({t['min']:.2f}-{t['max']:.2f}x), p99 **{q['median']:.2f}x** median "
            f"({q['min']:.2f}-{q['max']:.2f}x).", ""]


def cpu_table(quiet: dict, busy: dict, rows: int = 10) -> list[str]:
    """Markdown lines: each process's CPU (percent of one core) in both phases, busiest first."""
    if not quiet and not busy:
        return []
    names = sorted(set(quiet) | set(busy), key=lambda n: -(quiet.get(n, 0) + busy.get(n, 0)))[:rows]
    cell = lambda d, n: f"{d[n]:.1f}" if n in d else "<1"  # noqa: E731
    return ["CPU by process, percent of one core, sampled over the middle of each phase (the load client is "
            "`python -m bench freshness`; the feedback sender is its spawned child):", "",
            "| process | no publishes | learner publishing |", "|---|---|---|",
            *[f"| `{n.strip()}` | {cell(quiet, n)} | {cell(busy, n)} |" for n in names],
            f"| all | {sum(quiet.values()):.1f} | {sum(busy.values()):.1f} |", ""]


def plot(r: dict, path: str) -> None:
    """Throughput and p99 of both phases side by side, and the acknowledged -> served lags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("no publishes", r["without_publishes"]), ("learner publishing", r["during_publishes"])]
    fig, (tps, p99, lag) = plt.subplots(1, 3, figsize=(10, 3.5))
    names = [n for n, _ in phases]
    tps.bar(names, [p["tps"] for _, p in phases], color=["tab:blue", "tab:orange"])
    tps.set_ylabel("req/s")
    p99.bar(names, [p["p99_ms"] for _, p in phases], color=["tab:blue", "tab:orange"])
    p99.set_ylabel("p99 ms")
    lag.plot(sorted(r["ack_to_all_replicas_s"]), marker="o")
    lag.set_ylabel("ack -> every replica, s")
    lag.set_xlabel("probe (sorted)")
    fig.suptitle(f"/v1/predict at {r['users']} users, {r['replicas']} replica(s); learner "
                 f"{json.dumps(r['learner_settings']) if r.get('learner_settings') else 'as shipped'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench freshness", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="model store with the model to serve (copied; left unchanged)")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="quiet + publishing phase pairs, ratios per round (default 1)")
    p.add_argument("--learner", type=json.loads, default={}, metavar="JSON",
                   help='learner settings over the shipped ones, e.g. \'{"train_duty_cycle": 0.5}\'')
    p.add_argument("--out", default="docs/FRESHNESS_BENCH")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    report = run(a.store, a.users, a.duration, a.replicas, a.learner, a.rounds)
    command = "python -m bench freshness " + " ".join(argv if argv is not None else [])
    Path(a.out + ".json").write_text(json.dumps(report, indent=2))
    plot(report, a.out + ".png")
    Path(a.out + ".md").write_text(markdown(report, command) + f"\n![both phases and the lags]({Path(a.out).name}.png)\n")
    print(Path(a.out + ".md").read_text())
    return 0
