"""python -m bench quality: model families and training recipes, by seed, on clean and perturbed test sets.

Trains one model per (family, size, recipe, label smoothing, seed) in this process (no Ray: the
model, optimiser, batch size and epochs of `python -m train`, and its best-validation epoch) and
scores it on the template split's test set (unseen templates and slot values), on `test_seen`
(new sentences of training templates) and on the robustness set (train/robustness.py: the same
test sentences with unseen names, typos, padding, numbers as words, moved place phrases). A recipe
is the training augmentation (train/augment.py: "none", or kinds joined with "+").

Results accumulate in OUT.json (a run replaces an earlier one of the same configuration and seed,
so a long sweep can be split into several commands); OUT.md and OUT.png are rebuilt from all of it.

  python -m bench quality --archs lstm,cnn --seeds 0,1,2 --recipes none,names
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path


def subword_mix(r: dict) -> str | None:
    """How a run's model mixed word and n-gram rows (runs recorded before the field averaged them)."""
    return r.get("subword_mix", "mean") if r.get("char_ngrams") else None


def config_key(r: dict) -> tuple:
    return (r["lang"], r["arch"], r["size"], r["recipe"], r["label_smoothing"], r["epochs"],
            tuple(r.get("char_ngrams", ())), subword_mix(r))


def config_name(r: dict) -> str:
    from train.model import features_name

    extra = f", {features_name(r['char_ngrams'], subword_mix(r))}" if r.get("char_ngrams") else ""
    extra += f", label smoothing {r['label_smoothing']:g}" if r["label_smoothing"] else ""
    extra += f", {r['epochs']} epochs" if r["epochs"] != 15 else ""
    return f"{r['arch']} {r['size']}, augment {r['recipe']}{extra}"


def command_for(r: dict) -> str:
    cmd = (f"python -m bench quality --langs {r['lang']} --archs {r['arch']} --size {r['size']} "
           f"--recipes {r['recipe']} --seeds {r['seed']}")
    if r["label_smoothing"]:
        cmd += f" --label-smoothing {r['label_smoothing']:g}"
    if r["epochs"] != 15:
        cmd += f" --epochs {r['epochs']}"
    if r.get("char_ngrams"):
        cmd += f" --features {'-'.join(map(str, r['char_ngrams']))}"
        if subword_mix(r) == "mean":  # today's command builds word+grams models
            cmd += " (code of 2026-12-04: rows averaged)"
    return cmd


def train_one(lang: str, seed: int, arch: str, size: str, recipe: str, label_smoothing: float, epochs: int,
              char_ngrams: tuple[int, ...] = ()) -> dict:
    import keras

    from train.augment import augment, parse_kinds
    from train.data import DataSpec, load_dataset
    from train.evaluate import confusion_summary, predictions
    from train.model import new_model
    from train.robustness import robustness_set

    splits = load_dataset(DataSpec(langs=(lang,), seed=seed))
    train = augment(splits.train, seed, parse_kinds(recipe))
    index = {name: i for i, name in enumerate(splits.labels)}
    keras.utils.set_random_seed(seed)
    loaded = new_model(size, splits.labels, arch, char_ngrams)
    if label_smoothing:
        loaded.model.compile(optimizer=keras.optimizers.Adam(1e-3),
                             loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                             metrics=["accuracy"])
    else:
        from train.model import compile_for_training

        compile_for_training(loaded.model)

    from bench.features import fit_best

    best, wall = fit_best(loaded.model, train, splits.validation, index, seed, epochs, one_hot=bool(label_smoothing))

    test_pred = predictions(loaded, [e.text for e in splits.test])
    summary = confusion_summary([e.label for e in splits.test], test_pred, worst=5, pairs=8)
    clean = {e.text: p == e.label for e, p in zip(splits.test, test_pred)}
    seen = splits.test_seen
    seen_acc = sum(p == e.label for p, e in zip(predictions(loaded, [e.text for e in seen]), seen)) / len(seen)
    robust = robustness_set(splits.test, seed)
    robust_pred = predictions(loaded, [r.example.text for r in robust])
    by_kind: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r, p in zip(robust, robust_pred):
        by_kind[r.kind].append((p == r.example.label, clean[r.source]))
    right = [ok for pairs in by_kind.values() for ok, _ in pairs]
    return {"lang": lang, "seed": seed, "arch": arch, "size": size, "recipe": recipe,
            "label_smoothing": label_smoothing, "epochs": epochs, "char_ngrams": list(char_ngrams),
            "subword_mix": loaded.size.subword_mix if char_ngrams else None,
            "train_examples": len(train),
            "val_accuracy": best["val"], "best_epoch": best["epoch"], "test_accuracy": summary["accuracy"],
            "test_seen_accuracy": seen_acc, "robust_accuracy": sum(right) / len(right), "robust_examples": len(right),
            "robust_by_kind": {k: {"n": len(v), "accuracy": sum(ok for ok, _ in v) / len(v),
                                   "clean_accuracy": sum(c for _, c in v) / len(v)} for k, v in by_kind.items()},
            "per_intent": {y: v["accuracy"] for y, v in summary["per_intent"].items()},
            "most_confused": summary["most_confused"], "errors": summary["errors"],
            "train_s": wall, "parameters": loaded.model.count_params()}


def _spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[config_key(r)].append(r)
    out = []
    for key, mine in groups.items():
        per_intent: dict[str, list[float]] = defaultdict(list)
        for r in mine:
            for y, acc in r["per_intent"].items():
                per_intent[y].append(acc)
        intent_means = {y: statistics.mean(v) for y, v in per_intent.items()}
        worst = sorted(intent_means, key=lambda y: (intent_means[y], y))[:5]
        kinds = sorted({k for r in mine for k in r["robust_by_kind"]})
        test = [r["test_accuracy"] for r in mine]
        robust = [r["robust_accuracy"] for r in mine]
        confused = Counter()
        for r in mine:
            for y, ps in r["errors"].items():
                for p, n in ps.items():
                    confused[(y, p)] += n
        out.append({"name": config_name(mine[0]), **{k: mine[0][k] for k in ("lang", "arch", "size", "recipe",
                                                                           "label_smoothing", "epochs")},
                    "char_ngrams": mine[0].get("char_ngrams", []), "subword_mix": subword_mix(mine[0]),
                    "seeds": sorted(r["seed"] for r in mine),
                    "test_mean": statistics.mean(test), "test_stdev": statistics.stdev(test) if len(test) > 1 else 0.0,
                    "test_min": min(test), "test_max": max(test),
                    "test_seen_mean": statistics.mean(r["test_seen_accuracy"] for r in mine),
                    "robust_mean": statistics.mean(robust),
                    "robust_stdev": statistics.stdev(robust) if len(robust) > 1 else 0.0,
                    "robust_gap_mean": statistics.mean(t - r for t, r in zip(test, robust)),
                    "robust_by_kind_mean": {k: statistics.mean(r["robust_by_kind"][k]["accuracy"] for r in mine
                                                               if k in r["robust_by_kind"]) for k in kinds},
                    "robust_by_kind_clean_mean": {k: statistics.mean(r["robust_by_kind"][k]["clean_accuracy"]
                                                                     for r in mine if k in r["robust_by_kind"])
                                                  for k in kinds},
                    "worst_intents_mean": [{"intent": y, "accuracy": intent_means[y], "seeds": len(per_intent[y])}
                                           for y in worst],
                    "intents_below_070": sorted(y for y, a in intent_means.items() if a < 0.70),
                    "most_confused_total": [{"true": y, "predicted": p, "count": n}
                                            for (y, p), n in confused.most_common(6)],
                    "train_s_mean": statistics.mean(r["train_s"] for r in mine)})
    return sorted(out, key=lambda s: (s["lang"], s["size"], s["arch"], s["recipe"], s["label_smoothing"], s["epochs"]))


def markdown(report: dict) -> str:
    rows = report["runs"]
    kinds = sorted({k for r in rows for k in r["robust_by_kind"]})
    lines = ["# Model quality: families and training recipes over seeds", "",
             "Each model: trained in one process by `python -m bench quality` (no Ray Train; the model, Adam 1e-3, "
             "batch 64 and epochs of `python -m train`, the best-validation epoch). **test**: the template split's "
             "test set (templates and slot values training never saw). **seen**: new sentences of training templates. "
             "**robust**: the robustness set (train/robustness.py), the test sentences with unseen names, typos, "
             "padding, numbers as words, a moved place phrase; per kind in the last columns (in brackets: the clean "
             "accuracy of the same source sentences). Each seed has its own data split. "
             f"Last updated {report['date']}.", "",
             "## Summary (mean ± standard deviation over seeds)", "",
             "| configuration | seeds | test | min..max | seen | robust | test - robust | intents < 0.70 (mean over seeds) | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lines.append(f"| {s['name']} | {len(s['seeds'])} | **{s['test_mean']:.3f}** ± {s['test_stdev']:.3f} | "
                     f"{s['test_min']:.3f}..{s['test_max']:.3f} | {s['test_seen_mean']:.3f} | "
                     f"{s['robust_mean']:.3f} ± {s['robust_stdev']:.3f} | {100 * s['robust_gap_mean']:+.1f} pt | "
                     f"{', '.join(s['intents_below_070']) or 'none'} | {s['train_s_mean']:.0f} |")
    lines.append("")
    for s in report["summary"]:
        mine = sorted((r for r in rows if config_key(r) == config_key(s)), key=lambda r: r["seed"])
        lines += [f"## {s['name']} ({s['lang']})", "",
                  "| seed | test | seen | robust | " + " | ".join(kinds) + " | validation (epoch) | command |",
                  "|---|---|---|---|" + "---|" * len(kinds) + "---|---|"]
        for r in mine:
            cells = []
            for k in kinds:
                v = r["robust_by_kind"].get(k)
                cells.append(f"{v['accuracy']:.3f} ({v['clean_accuracy']:.3f}, n={v['n']})" if v else "")
            lines.append(f"| {r['seed']} | {r['test_accuracy']:.3f} | {r['test_seen_accuracy']:.3f} | "
                         f"{r['robust_accuracy']:.3f} | " + " | ".join(cells) +
                         f" | {r['val_accuracy']:.3f} ({r['best_epoch']}) | `{command_for(r)}` |")
        worst = ", ".join(f"{w['intent']} {w['accuracy']:.2f}" for w in s["worst_intents_mean"])
        confused = ", ".join(f"{c['true']} -> {c['predicted']} x{c['count']}" for c in s["most_confused_total"])
        lines += ["", f"Worst intents (mean over seeds): {worst}.  ",
                  f"Most confused, all seeds together (true -> predicted): {confused}.", ""]
    lines += [f"![test and robustness accuracy by configuration]({Path(report['out']).name}.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary)), 4.5))
    for i, s in enumerate(summary):
        ax.bar(i - 0.2, s["test_mean"], 0.4, color="tab:blue", label="test" if i == 0 else None)
        ax.bar(i + 0.2, s["robust_mean"], 0.4, color="tab:orange", label="robust" if i == 0 else None)
        for r in (r for r in report["runs"] if config_key(r) == config_key(s)):
            ax.plot(i - 0.2, r["test_accuracy"], "k.", markersize=4)
            ax.plot(i + 0.2, r["robust_accuracy"], "k.", markersize=4)
    ax.set_xticks(range(len(summary)), [s["name"].replace(", ", "\n") for s in summary], fontsize=7)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("accuracy (bars: mean, dots: seeds)")
    ax.set_ylim(0.6, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--langs", default="en", help="comma-separated bundled languages (default: en)")
    p.add_argument("--archs", default="lstm,cnn", help="model families (default: lstm,cnn)")
    p.add_argument("--size", default="small", choices=("small", "large"))
    p.add_argument("--seeds", default="0,1,2", help="data and initialisation seeds (default: 0,1,2)")
    p.add_argument("--recipes", default="none",
                   help="comma-separated training augmentations: none, or kinds joined with + "
                        "(names, padding, typos, numbers, order); default: none")
    p.add_argument("--label-smoothing", default="0", help="comma-separated label smoothing values (default: 0)")
    p.add_argument("--features", default="none",
                   help="comma-separated token features: none (words) or dash-separated character n-gram widths, "
                        "e.g. none,2-3-4 (default: none)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default="docs/QUALITY")
    a = p.parse_args(argv)
    from train.augment import parse_kinds
    from train.model import arch_named

    try:
        archs = [arch_named(x.strip()) for x in a.archs.split(",")]
        seeds = [int(s) for s in a.seeds.split(",")]
        recipes = [r.strip() for r in a.recipes.split(",")]
        for r in recipes:
            parse_kinds(r)
        smoothing = [float(x) for x in a.label_smoothing.split(",")]
        from bench.features import parse_features

        feature_sets = parse_features(a.features)
    except ValueError as err:
        p.error(str(err))
    if a.epochs < 1 or any(not 0 <= x < 1 for x in smoothing):
        p.error("--epochs must be at least 1 and --label-smoothing in [0, 1)")
    from bench.features import limit_tf_threads

    limit_tf_threads(2)
    out_json = Path(a.out + ".json")
    rows = json.loads(out_json.read_text())["runs"] if out_json.is_file() else []
    for lang in [x.strip() for x in a.langs.split(",") if x.strip()]:
        for seed in seeds:
            for arch in archs:
                for recipe in recipes:
                    for ls, grams in [(ls, grams) for ls in smoothing for grams in feature_sets]:
                        r = train_one(lang, seed, arch, a.size, recipe, ls, a.epochs, grams)
                        rows = [x for x in rows if (config_key(x), x["seed"]) != (config_key(r), seed)] + [r]
                        kinds = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in r["robust_by_kind"].items())
                        print(f"{config_name(r)} seed {seed}: test {r['test_accuracy']:.4f} (seen "
                              f"{r['test_seen_accuracy']:.4f}), robust {r['robust_accuracy']:.4f} ({kinds}), "
                              f"validation {r['val_accuracy']:.4f} at epoch {r['best_epoch']}, {r['train_s']:.0f} s",
                              flush=True)
                        report = {"date": time.strftime("%Y-%m-%d"), "out": a.out, "runs": rows,
                                  "summary": summarise(rows)}
                        out_json.parent.mkdir(parents=True, exist_ok=True)
                        out_json.write_text(json.dumps(report, indent=2))
    Path(a.out + ".md").write_text(markdown(report))
    plot(report, a.out + ".png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
