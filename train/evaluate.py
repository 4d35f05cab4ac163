"""Scoring a trained model on held-out data: both splits' accuracies and a per-intent confusion summary.

Accuracies (metrics.json):
- `test_accuracy_template`: the template split's test set, i.e. sentences from templates the model
  never saw, carrying slot values (areas, names, numbers) it never saw. None when the run used
  the sentence split (its training data holds every template, so there is nothing unseen to test).
- `test_accuracy_sentence`: new sentences from templates the model trained on, with training slot
  values: the sentence split's test set, or the template split's `test_seen` set.
- `test_accuracy`: the one for the split the run used (template by default).
"""

from __future__ import annotations

from collections import Counter, defaultdict

CONFUSION_FILE = "confusion.json"


def predictions(loaded, texts: list[str], batch: int = 512) -> list[str]:
    out = []
    for i in range(0, len(texts), batch):
        probs = loaded.predict(texts[i : i + batch])
        out.extend(loaded.labels[j] for j in probs.argmax(axis=1))
    return out


def confusion_summary(labels: list[str], predicted: list[str], worst: int = 5, pairs: int = 5) -> dict:
    """Per-intent accuracy, the worst intents and the most frequent (true -> predicted) mistakes."""
    totals, right = Counter(labels), Counter(y for y, p in zip(labels, predicted) if y == p)
    per_intent = {y: {"n": totals[y], "accuracy": right[y] / totals[y]} for y in sorted(totals)}
    mistakes = Counter((y, p) for y, p in zip(labels, predicted) if y != p)
    matrix: dict[str, dict[str, int]] = defaultdict(dict)
    for (y, p), n in mistakes.items():
        matrix[y][p] = n
    return {
        "examples": len(labels),
        "accuracy": sum(right.values()) / len(labels) if labels else float("nan"),
        "per_intent": per_intent,
        "worst_intents": [{"intent": y, **per_intent[y]}
                          for y in sorted(per_intent, key=lambda y: (per_intent[y]["accuracy"], y))[:worst]],
        "most_confused": [{"true": y, "predicted": p, "count": n}
                          for (y, p), n in sorted(mistakes.items(), key=lambda kv: (-kv[1], kv[0]))[:pairs]],
        "errors": {y: dict(sorted(ps.items())) for y, ps in sorted(matrix.items())},
    }


def evaluate(loaded, splits, split_mode: str) -> tuple[dict, dict]:
    """(accuracy metrics, confusion summary of the main test set) for a trained model."""
    test_pred = predictions(loaded, [e.text for e in splits.test])
    summary = confusion_summary([e.label for e in splits.test], test_pred)
    metrics = {"test_accuracy": summary["accuracy"], "split": split_mode}
    if split_mode == "template":
        seen = splits.test_seen
        seen_acc = (sum(p == e.label for p, e in zip(predictions(loaded, [e.text for e in seen]), seen)) / len(seen)
                    if seen else None)
        metrics.update(test_accuracy_template=summary["accuracy"], test_accuracy_sentence=seen_acc)
    else:
        metrics.update(test_accuracy_template=None, test_accuracy_sentence=summary["accuracy"])
    by_lang: dict[str, list[bool]] = defaultdict(list)
    for p, e in zip(test_pred, splits.test):
        by_lang[e.lang].append(p == e.label)
    if len(by_lang) > 1:
        metrics["test_accuracy_by_lang"] = {k: sum(v) / len(v) for k, v in sorted(by_lang.items())}
    return metrics, summary


def format_summary(summary: dict) -> str:
    """A few lines for the train CLI: the worst intents and the most confused pairs."""
    worst = ", ".join(f"{w['intent']} {w['accuracy']:.2f} (n={w['n']})" for w in summary["worst_intents"])
    pairs = ", ".join(f"{c['true']} -> {c['predicted']} x{c['count']}" for c in summary["most_confused"]) or "none"
    return f"  worst intents (test): {worst}\n  most confused (true -> predicted): {pairs}"
