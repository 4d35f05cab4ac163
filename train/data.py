"""Labelled sentences: the bundled chatbot-intent corpus, or a user's own CSV/JSONL file.

The bundled corpus is Home Assistant's intent templates (package `home-assistant-intents`,
Apache-2.0) expanded into sentences with `hassil`. Expansion is seeded, so the same options
give the same sentences and the same train/validation/test splits on every machine.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SUPPORTED_LANGS = ("en", "ko")


class DataFileError(ValueError):
    """A user data file that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    lang: str = "user"


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # sorted; the model's output order


@dataclass(frozen=True)
class DataSpec:
    """What to train on. Either bundled languages or a user file (path wins when set)."""

    langs: tuple[str, ...] = ("en",)
    path: str | None = None
    seed: int = 0
    per_template: int = 12  # sentences drawn per template: templates differ a lot in size
    max_per_intent: int = 600  # keeps big intents (TurnOn/Off) from drowning small ones
    min_per_intent: int = 10  # intents with fewer sentences cannot fill three splits
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    _scan_cap: int = field(default=2000, repr=False)  # expansions looked at per template

    def __post_init__(self) -> None:
        unknown = [lang for lang in self.langs if lang not in SUPPORTED_LANGS]
        if unknown:
            raise ValueError(
                f"unsupported language(s) {unknown}; the bundled corpus has {list(SUPPORTED_LANGS)}"
                " (train on another language with --data your_file.csv)"
            )
        if not self.path and not self.langs:
            raise ValueError("no data: give --langs (e.g. en,ko) or --data FILE")
        if not 0 < self.validation_fraction + self.test_fraction < 1:
            raise ValueError("validation and test fractions must be > 0 and add up to less than 1")


def _slot_values() -> dict:
    text = resources.files("train").joinpath("slot_values.json").read_text(encoding="utf-8")
    return json.loads(text)


def intent_examples(lang: str, spec: DataSpec = DataSpec()) -> list[Example]:
    """Expand one language's intent templates into labelled sentences (seeded, deduplicated)."""
    from hassil.intents import Intents, RangeSlotList, TextSlotList
    from hassil.sample import sample_sentence
    from home_assistant_intents import get_intents

    rng = random.Random(f"{spec.seed}:{lang}")
    intents = Intents.from_dict(get_intents(lang))
    slot_lists = dict(intents.slot_lists)
    for name, values in _slot_values()[lang].items():
        slot_lists[name] = TextSlotList.from_strings(values, name=name)
    for name, slot in intents.slot_lists.items():
        if isinstance(slot, RangeSlotList):  # 0..100 per number slot would explode the product
            numbers = list(range(slot.start, slot.stop + 1, slot.step or 1))
            picked = sorted(rng.sample(numbers, min(4, len(numbers))))
            slot_lists[name] = TextSlotList.from_strings([str(n) for n in picked], name=name)

    by_intent: dict[str, set[str]] = defaultdict(set)
    for intent_name, intent in sorted(intents.intents.items()):
        for data in intent.data:
            rules = {**intents.expansion_rules, **(data.expansion_rules or {})}
            for sentence in data.sentences:
                if any(n in data.wildcard_list_names for n in sentence.list_names(rules)):
                    continue  # free-text slots (messages, search queries) have no values to fill
                expanded = itertools.islice(
                    sample_sentence(sentence, slot_lists, rules, language=lang), spec._scan_cap
                )
                texts = sorted({" ".join(t.split()) for t in expanded if t.strip()})
                by_intent[intent_name].update(rng.sample(texts, min(spec.per_template, len(texts))))

    owners: dict[str, set[str]] = defaultdict(set)
    for intent_name, texts in by_intent.items():
        for text in texts:
            owners[text.lower()].add(intent_name)
    examples = []
    for intent_name, texts in sorted(by_intent.items()):
        # A sentence that several intents produce has no single right answer: drop it.
        unique = sorted(t for t in texts if len(owners[t.lower()]) == 1)
        if len(unique) < spec.min_per_intent:
            continue
        chosen = rng.sample(unique, min(spec.max_per_intent, len(unique)))
        examples.extend(Example(t, intent_name, lang) for t in sorted(chosen))
    return examples


def split(examples: list[Example], spec: DataSpec = DataSpec()) -> Splits:
    """Stratified, seeded split: every label appears in train, and in the others when it can."""
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


def load_dataset(spec: DataSpec) -> Splits:
    """The splits a training run uses: a user file when given, else the bundled languages."""
    if spec.path:
        examples = read_user_file(spec.path)
    else:
        examples = [ex for lang in spec.langs for ex in intent_examples(lang, spec)]
    return split(examples, spec)
