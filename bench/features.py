"""python -m bench features: word features against word + character n-gram features, by seed.

Trains the `small` model once per (language, seed, feature set) in this process (no Ray: the same
model, optimiser, batch size and epochs as `python -m train`, and its best-validation epoch) and
scores it on the template split's test set (unseen templates and slot values) and on `test_seen`
(new sentences of training templates). One line per model as it finishes; then OUT.json, OUT.md
(one table per language, the mean over seeds last) and OUT.png.

  python -m bench features --langs en,ko --seeds 0,1,2 --features none,2-3-4,3-4-5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_features(text: str) -> list[tuple[int, ...]]:
    """"none,2-3-4" -> [(), (2, 3, 4)], checked before any model trains."""
    from train.model import check_char_ngrams

    out = []
    for item in text.split(","):
        item = item.strip()
        grams = () if item == "none" else check_char_ngrams(int(n) for n in item.split("-"))
        if grams in out:
            raise ValueError(f"{item!r} is named twice")
        out.append(grams)
    return out


def fit_best(model, train: list, validation: list, index: dict, seed: int, epochs: int,
             one_hot: bool = False) -> tuple[dict, float]:
    """Fit `model` in this process (batches of 64, shuffled by `seed`) and leave it with the weights
    of its best validation epoch; returns ({"val", "epoch"}, wall seconds)."""
    import keras
    import tensorflow as tf

    def dataset(examples, shuffle: bool):
        y = [index[e.label] for e in examples]
        ds = tf.data.Dataset.from_tensor_slices(([e.text for e in examples], tf.one_hot(y, len(index)) if one_hot else y))
        if shuffle:
            ds = ds.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(64).prefetch(2)

    best = {"val": -1.0}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["val_accuracy"] > best["val"]:
                best.update(val=float(logs["val_accuracy"]), epoch=epoch + 1, weights=self.model.get_weights())

    started = time.perf_counter()
    model.fit(dataset(train, True), validation_data=dataset(validation, False), epochs=epochs,
              callbacks=[KeepBest()], verbose=0)
    wall = time.perf_counter() - started
    model.set_weights(best.pop("weights"))
    return best, wall


def train_one(lang: str, seed: int, grams: tuple[int, ...], arch: str, epochs: int) -> dict:
    import keras

    from train.data import DataSpec, load_dataset
    from train.model import accuracy, compile_for_training, features_name, new_model

    splits = load_dataset(DataSpec(langs=(lang,), seed=seed))
    index = {name: i for i, name in enumerate(splits.labels)}
    keras.utils.set_random_seed(seed)
    loaded = new_model("small", splits.labels, arch, grams)
    compile_for_training(loaded.model)

    best, wall = fit_best(loaded.model, splits.train, splits.validation, index, seed, epochs)

    def score(examples):
        return accuracy(loaded, [e.text for e in examples], [e.label for e in examples]) if examples else None

    return {"lang": lang, "seed": seed, "char_ngrams": list(grams), "subword_mix": loaded.size.subword_mix if grams else None,
            "features": features_name(grams, loaded.size.subword_mix), "arch": arch,
            "val_accuracy": best["val"], "best_epoch": best["epoch"], "test_accuracy": score(splits.test),
            "test_seen_accuracy": score(splits.test_seen), "train_s": wall,
            "parameters": loaded.model.count_params()}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for lang in dict.fromkeys(r["lang"] for r in rows):
        for features in dict.fromkeys(r["features"] for r in rows):
            mine = [r for r in rows if r["lang"] == lang and r["features"] == features]
            if mine:
                out.append({"lang": lang, "features": features, "seeds": len(mine),
                            "test_mean": statistics.mean(r["test_accuracy"] for r in mine),
                            "test_seen_mean": statistics.mean(r["test_seen_accuracy"] or 0.0 for r in mine),
                            "train_s_mean": statistics.mean(r["train_s"] for r in mine)})
    return out


def markdown(report: dict) -> str:
    rows, seeds = report["runs"], sorted({r["seed"] for r in report["runs"]})
    lines = [f"# Word against subword features ({report['arch']}, small)", "",
             f"Command: `{report['command']}`  ",
             "Each model: `small`, 15 epochs unless `--epochs`, Adam 1e-3, batch 64, the best-validation epoch, trained "
             "in one process (no Ray Train; the same model and recipe as `python -m train`). Test: the template "
             "split's test set (unseen templates and slot values); in brackets `test_seen` (new sentences of "
             f"training templates). Date: {report['date']}.", ""]
    for lang in dict.fromkeys(r["lang"] for r in rows):
        lines += [f"## {lang}", "", "| features | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | train s |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for s in (x for x in report["summary"] if x["lang"] == lang):
            cells = []
            for seed in seeds:
                r = next((r for r in rows if r["lang"] == lang and r["features"] == s["features"] and r["seed"] == seed),
                         None)
                cells.append(f"{r['test_accuracy']:.3f} ({r['test_seen_accuracy'] or 0.0:.3f})" if r else "")
            lines.append(f"| {s['features']} | " + " | ".join(cells) +
                         f" | **{s['test_mean']:.3f}** ({s['test_seen_mean']:.3f}) | {s['train_s_mean']:.0f} |")
        lines.append("")
    lines += [f"![test accuracy by feature set]({Path(report['out']).name}.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    langs = list(dict.fromkeys(s["lang"] for s in summary))
    features = list(dict.fromkeys(s["features"] for s in summary))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(features))
    for i, feat in enumerate(features):
        xs = [langs.index(s["lang"]) + i * width for s in summary if s["features"] == feat]
        ax.bar(xs, [s["test_mean"] for s in summary if s["features"] == feat], width, label=feat)
        for r in (r for r in report["runs"] if r["features"] == feat):
            ax.plot(langs.index(r["lang"]) + i * width, r["test_accuracy"], "k.", markersize=4)
    ax.set_xticks([j + width * (len(features) - 1) / 2 for j in range(len(langs))], langs)
    ax.set_ylabel("template-split test accuracy (bars: mean, dots: seeds)")
    ax.set_ylim(0.5, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def limit_tf_threads(n: int) -> None:
    """At most n TensorFlow threads per op, unless TensorFlow already runs in this process (a
    caller's settings stand then: TensorFlow refuses the change)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench features", description=__doc__.split("\n\n")[0])
    p.add_argument("--langs", default="en", help="comma-separated bundled languages (default: en)")
    p.add_argument("--seeds", default="0,1,2", help="data and initialisation seeds (default: 0,1,2)")
    p.add_argument("--features", default="none,2-3-4,3-4-5",
                   help="feature sets: none (words alone) or dash-separated n-gram widths (default: none,2-3-4,3-4-5)")
    p.add_argument("--arch", choices=("lstm", "cnn"), default="lstm")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default="docs/FEATURES")
    a = p.parse_args(argv)
    try:
        feature_sets = parse_features(a.features)
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError as err:
        p.error(f"--features/--seeds: {err}")
    if len(set(seeds)) != len(seeds) or a.epochs < 1:
        p.error("--seeds must be distinct and --epochs at least 1")
    limit_tf_threads(2)
    rows = []
    for lang in [x.strip() for x in a.langs.split(",") if x.strip()]:
        for seed in seeds:
            for grams in feature_sets:
                rows.append(train_one(lang, seed, grams, a.arch, a.epochs))
                r = rows[-1]
                print(f"{lang} seed {seed} {r['features']}: test {r['test_accuracy']:.4f} (seen "
                      f"{r['test_seen_accuracy'] or 0.0:.4f}), validation {r['val_accuracy']:.4f} at epoch {r['best_epoch']}, "
                      f"{r['train_s']:.0f} s", flush=True)
    report = {"command": "python -m bench features " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "arch": a.arch, "out": a.out, "runs": rows,
              "summary": summarise(rows)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(report, indent=2))
    Path(a.out + ".md").write_text(markdown(report))
    plot(report, a.out + ".png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
