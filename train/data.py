"""Labelled sentences: the bundled chatbot-intent corpus, or a user's own CSV/JSONL file.

The bundled corpus is Home Assistant's intent templates (package `home-assistant-intents`,
Apache-2.0) expanded into sentences with `hassil`. Expansion is seeded, so the same options
give the same sentences and the same train/validation/test splits on every machine.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SPLIT_MODES = ("template", "sentence")
SLOT_MODES = ("generated", "generated+placeholders", "bundled")
MIN_INTENTS = 10  # a language needs this many intents with enough sentences to be worth training on


class DataFileError(ValueError):
    """A user data file that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    lang: str = "user"
    group: str = ""  # the template it was expanded from ("en:HassTurnOn:0:3"); "" for user data


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # sorted; the model's output order
    # Template split only: new expansions of the training templates (with training slot values),
    # i.e. what the sentence split's test set measures. Empty for the sentence split.
    test_seen: list[Example] = field(default_factory=list)


def bundled_langs() -> list[str]:
    """Every language the home-assistant-intents package bundles."""
    from home_assistant_intents import get_languages

    return sorted(get_languages())


def _slot_values() -> dict:
    text = resources.files("train").joinpath("slot_values.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


# The languages the bundled corpus can train: the package has their templates and
# slot_values.json has areas, names and floors to fill them with (Home Assistant fills those from
# a user's home; without them the device intents produce no sentences). Each yields at least
# MIN_INTENTS intents with min_per_intent sentences (tests/test_data.py checks it).
SUPPORTED_LANGS = tuple(sorted(_slot_values()))


@dataclass(frozen=True)
class DataSpec:
    """What to train on. Either bundled languages or a user file (path wins when set).

    New fields need defaults: the online learner rebuilds a version's DataSpec from the `data`
    dict in its metrics.json, and versions trained before a field existed lack it.
    """

    langs: tuple[str, ...] = ("en",)
    path: str | None = None
    seed: int = 0
    per_template: int = 12  # sentences drawn per template: templates differ a lot in size
    max_per_intent: int = 600  # keeps big intents (TurnOn/Off) from drowning small ones
    min_per_intent: int = 10  # intents with fewer sentences cannot fill three splits
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # "template": every expansion of one template lands in one split, and validation/test
    # sentences carry slot values training never saw (honest); "sentence": sentences are split
    # at random, so test sentences are siblings of training ones. A user file
    # (path) has no templates and is always split by sentence.
    split: str = "template"
    # Training slot values, one of SLOT_MODES (train/slot_pool.py). "bundled" (slot_values.json
    # only) measured best on the template split's unseen names (docs/TRAINING.md); validation and
    # test values are held out of the generated pool in every mode.
    slots: str = "bundled"
    # Extra training copies with made-up names, padding, typos... (train/augment.py): kinds joined
    # with "+", or "none". Only the training loop applies it; the splits here are never augmented.
    augment: str = "names+padding+typos"
    _scan_cap: int = field(default=2000, repr=False)  # expansions looked at per template

    def __post_init__(self) -> None:
        unknown = [lang for lang in self.langs if lang not in SUPPORTED_LANGS]
        if unknown:
            bundled = [lang for lang in bundled_langs() if lang not in SUPPORTED_LANGS]
            raise ValueError(
                f"unsupported language(s) {unknown}; the bundled corpus trains {list(SUPPORTED_LANGS)}. "
                f"The intents package also has templates for {', '.join(bundled)}, but no slot values "
                "(areas, device names, floors) to expand them with: add them to train/slot_values.json, "
                "or train on your own sentences with --data your_file.csv"
            )
        if not self.path and not self.langs:
            raise ValueError("no data: give --langs (e.g. en,ko) or --data FILE")
        if not 0 < self.validation_fraction + self.test_fraction < 1:
            raise ValueError("validation and test fractions must be > 0 and add up to less than 1")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"unknown split {self.split!r}; choose one of {list(SPLIT_MODES)}")
        if self.slots not in SLOT_MODES:
            raise ValueError(f"unknown slot values {self.slots!r}; choose one of {list(SLOT_MODES)}")
        from train.augment import parse_kinds

        parse_kinds(self.augment)  # raises with the list of kinds

    @property
    def effective_split(self) -> str:
        return "sentence" if self.path else self.split


@dataclass(frozen=True)
class _Template:
    intent: str
    group: str  # "lang:intent:data_index:sentence_index"
    sentence: object  # hassil Sentence
    rules: dict
    lists: tuple[str, ...]  # slot list names it uses


def _templates(lang: str):
    from hassil.intents import Intents
    from home_assistant_intents import get_intents

    intents = Intents.from_dict(get_intents(lang))
    templates = []
    for intent_name, intent in sorted(intents.intents.items()):
        for di, data in enumerate(intent.data):
            rules = {**intents.expansion_rules, **(data.expansion_rules or {})}
            for si, sentence in enumerate(data.sentences):
                names = tuple(sorted(set(sentence.list_names(rules))))
                if any(n in data.wildcard_list_names for n in names):
                    continue  # free-text slots (messages, search queries) have no values to fill
                templates.append(_Template(intent_name, f"{lang}:{intent_name}:{di}:{si}", sentence, rules, names))
    return intents, templates


def _assign_templates(templates: list[_Template], spec: DataSpec, lang: str) -> dict[str, str]:
    """Template group -> split, per intent: about test_fraction / validation_fraction of its templates.

    An intent needs 3 templates to have one in test and 4 to also have one in validation; with
    fewer, all its templates stay in training (it is learned but not scored: the summary says so).
    """
    by_intent: dict[str, list[str]] = defaultdict(list)
    for t in templates:
        by_intent[t.intent].append(t.group)
    assigned = {}
    for intent, groups in sorted(by_intent.items()):
        groups = sorted(groups)
        random.Random(f"{spec.seed}:{lang}:{intent}:templates").shuffle(groups)
        n = len(groups)
        n_test = max(1, round(n * spec.test_fraction)) if n >= 3 else 0
        n_val = max(1, round(n * spec.validation_fraction)) if n >= 4 else 0
        for i, g in enumerate(groups):
            assigned[g] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return assigned


@functools.lru_cache(maxsize=8)
def _expand(lang: str, spec: DataSpec) -> dict[str, tuple[Example, ...]]:
    """Expand one language's templates into labelled sentences (seeded, deduplicated).

    Template split: {"train", "validation", "test", "test_seen"}; sentence split: {"all"}.
    Kept per (language, spec) for the process: expansion is the slow part of loading, and its
    result is immutable (tuples of frozen Examples).
    """
    from hassil.intents import RangeSlotList, TextSlotList
    from hassil.sample import sample_sentence

    from train.slot_pool import number_pools, slot_pools

    intents, templates = _templates(lang)
    grouped = spec.split == "template"
    pools = slot_pools(lang, _slot_values()[lang], spec.seed, spec.slots)
    numbers = {
        name: number_pools([str(n) for n in range(slot.start, slot.stop + 1, slot.step or 1)], spec.seed, name)
        for name, slot in intents.slot_lists.items() if isinstance(slot, RangeSlotList)
    }
    assigned = _assign_templates(templates, spec, lang) if grouped else {}
    extra_seen = math.ceil(spec.per_template * spec.test_fraction) if grouped else 0

    found: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))  # part -> intent -> text -> group
    for t in templates:
        part = assigned.get(t.group, "train")
        rng = random.Random(f"{spec.seed}:{t.group}")
        lists = dict(intents.slot_lists)
        for name in t.lists:  # a few values per template: the product of big pools would explode
            if name in numbers:
                values, k = numbers[name].for_split(part)[name], 4
            elif name in pools.train:
                values, k = pools.for_split(part)[name], 6
            else:
                continue
            lists[name] = TextSlotList.from_strings(rng.sample(values, min(k, len(values))), name=name)
        expanded = itertools.islice(sample_sentence(t.sentence, lists, t.rules, language=lang), spec._scan_cap)
        texts = sorted({" ".join(x.split()) for x in expanded if x.strip()})
        picked = rng.sample(texts, min(spec.per_template + (extra_seen if part == "train" else 0), len(texts)))
        for i, text in enumerate(picked):
            where = part if not grouped else ("test_seen" if part == "train" and i >= spec.per_template else part)
            found[where if grouped else "all"][t.intent].setdefault(text, t.group)

    owners: dict[str, set[str]] = defaultdict(set)
    for by_intent in found.values():
        for intent_name, texts in by_intent.items():
            for text in texts:
                owners[text.lower()].add(intent_name)
    rng = random.Random(f"{spec.seed}:{lang}")
    parts = ("train", "validation", "test", "test_seen") if grouped else ("all",)
    caps = {"all": spec.max_per_intent,
            "train": round(spec.max_per_intent * (1 - spec.validation_fraction - spec.test_fraction)),
            "validation": round(spec.max_per_intent * spec.validation_fraction),
            "test": round(spec.max_per_intent * spec.test_fraction),
            "test_seen": round(spec.max_per_intent * spec.test_fraction)}
    seen: set[str] = set()  # earlier parts win: a held-out sentence never repeats a training one
    kept: dict[str, dict[str, list[tuple[str, str]]]] = {p: {} for p in parts}
    for part in parts:
        for intent_name, texts in sorted(found[part].items()):
            # A sentence that several intents produce has no single right answer: drop it.
            unique = sorted((t, g) for t, g in texts.items() if len(owners[t.lower()]) == 1 and t.lower() not in seen)
            kept[part][intent_name] = unique
        for unique in kept[part].values():
            seen.update(t.lower() for t, _ in unique)
    out: dict[str, list[Example]] = {p: [] for p in parts}
    intents_kept = {i for i in kept[parts[0]]
                    if sum(len(kept[p].get(i, [])) for p in parts if p != "test_seen") >= spec.min_per_intent}
    for part in parts:
        for intent_name, unique in sorted(kept[part].items()):
            if intent_name not in intents_kept:
                continue
            chosen = rng.sample(unique, min(caps[part], len(unique)))
            out[part].extend(Example(t, intent_name, lang, g) for t, g in sorted(chosen))
    return {part: tuple(examples) for part, examples in out.items()}


def _expansion_spec(lang: str, spec: DataSpec) -> DataSpec:
    """The fields of `spec` one language's expansion depends on (the rest reset, so specs that
    differ only there share one cached expansion)."""
    return dataclasses.replace(spec, langs=(lang,), path=None, augment="none")


def intent_examples(lang: str, spec: DataSpec = DataSpec()) -> list[Example]:
    """Every sentence one language's templates expand into (all splits together; seeded)."""
    return [ex for part in _expand(lang, _expansion_spec(lang, spec)).values() for ex in part]


def split(examples: list[Example], spec: DataSpec = DataSpec()) -> Splits:
    """Sentence split, stratified and seeded: every label appears in train, and in the others when it can."""
    rng = random.Random(spec.seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    train, validation, test = [], [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda e: (e.lang, e.text))
        rng.shuffle(group)
        n_test = int(round(len(group) * spec.test_fraction)) if len(group) >= 3 else 0
        n_val = int(round(len(group) * spec.validation_fraction)) if len(group) >= 3 else 0
        test.extend(group[:n_test])
        validation.extend(group[n_test : n_test + n_val])
        train.extend(group[n_test + n_val :])
    for part in (train, validation, test):
        rng.shuffle(part)
    return Splits(train, validation, test, sorted(by_label))


def read_user_file(path: str | Path) -> list[Example]:
    """Read (text, label) rows from a .csv (with a header) or .jsonl file; errors name the row."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = raw[: err.start].count(b"\n") + 1
        raise DataFileError(
            f"{path}: line {row}: not valid UTF-8 (byte {raw[err.start]:#x}); save the file as UTF-8"
        ) from err
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, content)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, content)
    else:
        raise DataFileError(f"{path}: unknown file type {suffix!r}; use .csv or .jsonl")
    examples = []
    for line_no, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataFileError(f"{path}: row {line_no}: empty or missing 'text'")
        if not isinstance(label, str) or not label.strip():
            raise DataFileError(f"{path}: row {line_no}: empty or missing 'label'")
        examples.append(Example(text.strip(), label.strip()))
    if not examples:
        raise DataFileError(f"{path}: no rows")
    return examples


def _csv_rows(path: Path, content: str):
    reader = csv.DictReader(io.StringIO(content))
    missing = {"text", "label"} - set(reader.fieldnames or [])
    if missing:
        raise DataFileError(
            f"{path}: row 1 (header): missing column(s) {sorted(missing)}; "
            f"found {reader.fieldnames}; the header must name 'text' and 'label'"
        )
    for row in reader:
        yield reader.line_num, row.get("text"), row.get("label")


def _jsonl_rows(path: Path, content: str):
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: row {line_no}: not JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise DataFileError(f"{path}: row {line_no}: expected an object with text and label")
        yield line_no, obj.get("text"), obj.get("label")


def spec_from_record(data: dict) -> DataSpec:
    """The DataSpec a version's metrics.json "data" records. A record without "split" names a
    model trained on a sentence split, and one without "augment" a model trained unaugmented, so
    they are rebuilt that way; such a record may come from another corpus expansion, so the
    rebuilt split is close to, not the same as, what it trained on (docs/TRAINING.md): retrain or
    fine-tune to judge it exactly."""
    return DataSpec(**{"split": "sentence", "augment": "none", **data, "langs": tuple(data.get("langs") or ())})


def load_dataset(spec: DataSpec) -> Splits:
    """The splits a training run uses: a user file when given, else the bundled languages."""
    if spec.path:
        return split(read_user_file(spec.path), spec)
    if spec.split == "sentence":
        return split([ex for lang in spec.langs for ex in intent_examples(lang, spec)], spec)
    parts: dict[str, list[Example]] = defaultdict(list)
    for lang in spec.langs:
        for part, examples in _expand(lang, _expansion_spec(lang, spec)).items():
            parts[part].extend(examples)
    rng = random.Random(spec.seed)
    for examples in parts.values():
        rng.shuffle(examples)
    labels = sorted({e.label for e in parts["train"]})
    return Splits(parts["train"], parts["validation"], parts["test"], labels, parts["test_seen"])


def stats(langs: tuple[str, ...], seed: int = 0, slots: str = DataSpec.slots) -> str:
    """Per language and intent: train/validation/test counts under the template and the sentence split."""
    lines = [f"trainable languages: {', '.join(SUPPORTED_LANGS)} "
             f"(the intents package bundles {len(bundled_langs())}: train/slot_values.json has slot values for these)"]
    for lang in langs:
        template = load_dataset(DataSpec(langs=(lang,), seed=seed, slots=slots, split="template"))
        sentence = load_dataset(DataSpec(langs=(lang,), seed=seed, slots=slots, split="sentence"))
        count = {name: {part: Counter(e.label for e in getattr(s, part)) for part in ("train", "validation", "test")}
                 for name, s in (("template", template), ("sentence", sentence))}
        count["template"]["test_seen"] = Counter(e.label for e in template.test_seen)
        intents = sorted(set(template.labels) | set(sentence.labels))
        width = max(len(i) for i in intents) + 2
        lines += ["", f"{lang}: {len(intents)} intents, "
                  f"{sum(len(getattr(sentence, p)) for p in ('train', 'validation', 'test')):,} sentences (sentence split)",
                  f"{'intent':<{width}}{'template split: train':>22}{'val':>6}{'test':>6}{'seen':>6}"
                  f"{'sentence split: train':>24}{'val':>6}{'test':>6}"]
        for intent in intents + ["total"]:
            def n(mode, part):
                c = count[mode][part]
                return sum(c.values()) if intent == "total" else c[intent]
            lines.append(f"{intent:<{width}}{n('template', 'train'):>22}{n('template', 'validation'):>6}"
                         f"{n('template', 'test'):>6}{n('template', 'test_seen'):>6}"
                         f"{n('sentence', 'train'):>24}{n('sentence', 'validation'):>6}{n('sentence', 'test'):>6}")
    lines += ["", "template split: validation/test hold templates (and slot values) training never saw; an intent "
              "with fewer than 3 templates has none in test (4 for validation). seen: new sentences of training "
              "templates (the sentence-split accuracy of a template-split run)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.data", description="Inspect the bundled training data.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="per-language, per-intent sentence counts in each split")
    s.add_argument("--langs", default=",".join(SUPPORTED_LANGS),
                   help=f"comma-separated languages (default: {','.join(SUPPORTED_LANGS)})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--slots", choices=SLOT_MODES, default=DataSpec.slots)
    a = p.parse_args(argv)
    langs = tuple(x.strip() for x in a.langs.split(",") if x.strip())
    try:
        DataSpec(langs=langs)
    except ValueError as err:
        p.error(str(err))
    print(stats(langs, a.seed, a.slots))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
