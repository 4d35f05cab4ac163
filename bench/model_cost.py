"""python -m bench model_cost: CPU time per text of one model call, by family and features.

Each model is built fresh (the small size, the bundled English labels; cost does not depend on
the weights) and called through its compiled predict function, as a replica calls it, with one
TensorFlow thread, on the English test sentences. Rounds are interleaved (every model once per
round) and each figure is the median over rounds, so a busy moment hits every model alike.

  python -m bench model_cost --batches 1,8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# (name, family, character n-gram widths); the first is what the others are compared with.
MODELS = [("lstm, words", "lstm", ()), ("cnn, words", "cnn", ()),
          ("cnn, words + char 2/3-grams", "cnn", (2, 3)), ("cnn, words + char 2/3/4-grams", "cnn", (2, 3, 4))]


def measure(batches: list[int], rounds: int, texts_per_round: int) -> dict:
    import tensorflow as tf

    from train.data import DataSpec, load_dataset
    from train.model import new_model

    splits = load_dataset(DataSpec(langs=("en",)))
    texts = [e.text for e in splits.test][:512]
    models = {name: new_model("small", splits.labels, arch, grams) for name, arch, grams in MODELS}
    rows = []
    for batch in batches:
        per_round: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, loaded in models.items():
                fn = loaded.predict_fn()
                for i in range(0, 64, batch):  # traced and warm before the clock starts
                    fn(tf.constant(texts[i:i + batch]))
                started, done = time.process_time(), 0
                while done < texts_per_round:
                    start = done % (len(texts) - batch)
                    fn(tf.constant(texts[start:start + batch]))
                    done += batch
                per_round[name].append((time.process_time() - started) / done * 1e6)
        base = statistics.median(per_round[MODELS[0][0]])
        for name, arch, grams in MODELS:
            us = statistics.median(per_round[name])
            rows.append({"batch": batch, "model": name, "arch": arch, "char_ngrams": list(grams),
                         "cpu_us_per_text": us, "rounds_us": per_round[name], "vs_first": us / base})
            print(f"batch {batch}: {name:32s} {us:7.0f} us CPU per text, {us / base:.2f}x {MODELS[0][0]}", flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "rounds": rounds, "texts_per_round": texts_per_round, "rows": rows}


def markdown(report: dict, command: str) -> str:
    lines = ["# Model-call cost by family and features", "",
             f"`{command}` ({report['date']}): CPU time per text of the compiled predict function, one "
             f"TensorFlow thread, median of {report['rounds']} interleaved rounds of {report['texts_per_round']} "
             f"English test sentences each. The model call only: a request also pays Serve's ingress and "
             f"the replica's HTTP handling (docs/BENCHMARKS.md).", "",
             f"| batch | model | CPU us per text | vs {MODELS[0][0]} |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['model']} | {r['cpu_us_per_text']:.0f} | {r['vs_first']:.2f}x |")
    return "\n".join(lines + ["", f"![cost per text]({Path(report['out']).name}.png)", ""])


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["rows"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(MODELS)
    for i, (name, _, _) in enumerate(MODELS):
        ys = [next(r["cpu_us_per_text"] for r in report["rows"] if r["batch"] == b and r["model"] == name)
              for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=name)
    ax.set_xticks([j + width * (len(MODELS) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("CPU us per text (one model call)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench model_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default: 3)")
    p.add_argument("--texts", type=int, default=1024, help="texts per model per round (default: 1024)")
    p.add_argument("--out", default="docs/MODEL_COST")
    a = p.parse_args(argv)
    try:
        batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches takes comma-separated integers, got {a.batches!r}")
    if any(b < 1 or b > 256 for b in batches) or a.rounds < 1 or a.texts < 1:
        p.error("--batches must be 1..256, --rounds and --texts at least 1")
    import tensorflow as tf

    try:  # one thread per op, as a replica runs (serve/settings.py: tf_threads)
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already runs in this process: its settings stand
        pass
    run(batches, a.rounds, a.texts, a.out,
        "python -m bench model_cost " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


def run(batches: list[int], rounds: int, texts: int, out: str, command: str) -> dict:
    """Measure and write OUT.json, .md and .png (TensorFlow's threads as the caller set them)."""
    report = {**measure(batches, rounds, texts), "out": out}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({**report, "command": command}, indent=2))
    Path(out + ".md").write_text(markdown(report, command))
    plot(report, out + ".png")
    return report


if __name__ == "__main__":
    sys.exit(main())
