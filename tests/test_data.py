"""The bundled corpus expands deterministically; bad user files stop with the file and row named."""

from __future__ import annotations

from collections import Counter

import pytest

from tests._helpers import write_jsonl
from train.data import DataFileError, DataSpec, intent_examples, load_dataset, read_user_file, spec_from_record


@pytest.fixture(scope="module")
def english():
    return load_dataset(DataSpec(langs=("en",)))


def test_english_expansion_counts(english):
    assert len(english.labels) >= 30  # ~35+ English intents, minus those too small to split
    total = len(english.train) + len(english.validation) + len(english.test)
    assert 3000 <= total <= 30 * 600
    assert abs(len(english.test) / total - 0.1) < 0.02
    per_label = Counter(e.label for e in english.train)
    assert set(per_label) == set(english.labels)  # every label is learnable
    assert max(per_label.values()) <= 600
    assert all(e.lang == "en" and e.text.strip() for e in english.train)


def test_splits_are_disjoint_and_deterministic(english):
    from train.data import _expand

    _expand.cache_clear()  # expanded again, not handed back from this process's cache
    again = load_dataset(DataSpec(langs=("en",)))
    assert again == english
    train_texts = {e.text for e in english.train}
    assert not train_texts & {e.text for e in english.test}
    assert not train_texts & {e.text for e in english.validation}
    other = load_dataset(DataSpec(langs=("en",), seed=1))
    assert other.train != english.train


def test_korean_and_mixed_languages():
    ko = intent_examples("ko")
    assert len({e.label for e in ko}) >= 15
    assert all(e.lang == "ko" for e in ko)
    assert any("켜" in e.text for e in ko)  # real Korean sentences ("turn on")
    both = load_dataset(DataSpec(langs=("en", "ko")))
    assert {e.lang for e in both.test} == {"en", "ko"}


def test_unknown_language_rejected():
    with pytest.raises(ValueError, match="unsupported language.*'xx'"):
        DataSpec(langs=("xx",))


def test_user_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text('text,label\n"hello, there",greet\nbye now,leave\n', encoding="utf-8")
    assert [(e.text, e.label) for e in read_user_file(csv_path)] == [("hello, there", "greet"), ("bye now", "leave")]
    jl = write_jsonl(tmp_path / "mine.jsonl", [{"text": "불 켜줘", "label": "on"}, {"text": "x", "label": "off"}])
    assert read_user_file(jl)[0].text == "불 켜줘"
    rows = [{"text": f"sentence {i}", "label": f"l{i % 2}"} for i in range(40)]
    splits = load_dataset(DataSpec(path=str(write_jsonl(tmp_path / "big.jsonl", rows))))
    assert splits.labels == ["l0", "l1"] and len(splits.test) == 4


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nolabel.csv", b"text,intent\nhi,greet\n", r"nolabel\.csv: row 1 \(header\): missing column\(s\) \['label'\]"),
        ("empty.csv", b"text,label\nhi,greet\n  ,greet\n", r"empty\.csv: row 3: empty or missing 'text'"),
        ("latin1.csv", b"text,label\nhi,greet\ncaf\xe9,order\n", r"latin1\.csv: line 3: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "a", "label": "b"}\n{"text": \n', r"bad\.jsonl: row 2: not JSON"),
        ("nolabel.jsonl", b'{"text": "a"}\n', r"nolabel\.jsonl: row 1: empty or missing 'label'"),
        ("data.txt", b"a\tb\n", r"unknown file type '\.txt'"),
    ],
)
def test_bad_user_file_names_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        read_user_file(path)


def test_template_split_keeps_each_template_in_one_split(english):
    where: dict[str, set[str]] = {}
    for part in ("train", "validation", "test"):
        for e in getattr(english, part):
            assert e.group.startswith(f"en:{e.label}:")
            where.setdefault(e.group, set()).add(part)
    assert all(len(parts) == 1 for parts in where.values())
    held_out = {e.group for e in english.validation + english.test}
    assert english.test_seen and not {e.group for e in english.test_seen} & held_out  # seen: training templates
    texts = {e.text.lower() for e in english.train}
    assert not texts & {e.text.lower() for e in english.test + english.validation + english.test_seen}
    # stratified: most intents are scored, each on templates of its own
    assert len({e.label for e in english.test}) >= 25
    assert set(english.labels) == {e.label for e in english.train}


def test_held_out_slot_values_never_in_training():
    from train.data import _slot_values
    from train.slot_pool import slot_pools

    pools = slot_pools("en", _slot_values()["en"], 0, "generated")
    for slot in ("area", "name", "floor"):
        assert pools.test[slot] and pools.validation[slot]
        assert not set(pools.test[slot]) & set(pools.train[slot])
        assert not set(pools.validation[slot]) & set(pools.train[slot])
        assert not set(pools.test[slot]) & set(pools.validation[slot])
        assert set(_slot_values()["en"][slot]) <= set(pools.train[slot])  # the bundled ones train
    # The test sentences really carry them, and no training sentence does.
    english = load_dataset(DataSpec(langs=("en",)))
    areas = [a for a in pools.test["area"] if any(f" {a}" in e.text for e in english.test)]
    assert len(areas) >= 5
    train_text = "\n".join(" " + e.text + " " for e in english.train)
    leaked = [a for a in areas if f" {a} " in train_text]  # only by chance, inside a longer training value
    assert len(leaked) <= len(areas) // 10, leaked


def test_sentence_split_option_and_user_files_split_by_sentence(tmp_path):
    spec = DataSpec(langs=("ko",), split="sentence")
    ko = load_dataset(spec)
    assert not ko.test_seen and len({e.label for e in ko.test}) == len(ko.labels)  # every intent in test
    assert {e.group for e in ko.test} & {e.group for e in ko.train}  # siblings on both sides
    rows = [{"text": f"sentence {i}", "label": f"l{i % 2}"} for i in range(40)]
    user = DataSpec(path=str(write_jsonl(tmp_path / "u.jsonl", rows)))
    assert user.split == "template" and user.effective_split == "sentence"
    with pytest.raises(ValueError, match="unknown split 'words'"):
        DataSpec(split="words")


def test_metrics_data_from_older_versions_still_builds_a_spec():
    import dataclasses

    old = {"langs": ["en"], "path": None, "seed": 0, "per_template": 12, "max_per_intent": 600,
           "min_per_intent": 10, "validation_fraction": 0.1, "test_fraction": 0.1, "_scan_cap": 2000}
    spec = spec_from_record(old)  # as online_learning/learner.py does
    assert spec.split == "sentence" and spec.slots == DataSpec.slots  # what that version trained on
    new = dataclasses.asdict(DataSpec())  # what metrics.json records now round-trips
    assert spec_from_record(new) == DataSpec() and DataSpec().split == "template"


def test_unsupported_bundled_language_lists_what_exists():
    with pytest.raises(ValueError) as err:
        DataSpec(langs=("en", "fr"))
    message = str(err.value)
    assert "['fr']" in message and "['en', 'ko']" in message and " de, " in message and "--data" in message


def test_every_supported_language_has_enough_intents():
    from train.data import MIN_INTENTS, SUPPORTED_LANGS, bundled_langs

    assert set(SUPPORTED_LANGS) <= set(bundled_langs())
    for lang in SUPPORTED_LANGS:
        splits = load_dataset(DataSpec(langs=(lang,)))
        assert len(splits.labels) >= MIN_INTENTS, lang


def test_stats_cli_prints_per_intent_counts(capsys):
    from train.data import main

    assert main(["stats", "--langs", "ko"]) == 0
    out = capsys.readouterr().out
    assert "trainable languages: en, ko" in out
    ko = load_dataset(DataSpec(langs=("ko",)))
    turn_on = [line for line in out.splitlines() if line.startswith("HassTurnOn ")]
    assert len(turn_on) == 1
    counts = [int(x) for x in turn_on[0].split()[1:]]
    assert counts[:3] == [sum(e.label == "HassTurnOn" for e in getattr(ko, p)) for p in ("train", "validation", "test")]
    total = [line for line in out.splitlines() if line.startswith("total ")][0].split()
    assert int(total[1]) == len(ko.train) and int(total[3]) == len(ko.test)
    with pytest.raises(SystemExit):
        main(["stats", "--langs", "xx"])
    assert "unsupported language(s) ['xx']" in capsys.readouterr().err


def test_confusion_summary_names_worst_intents_and_pairs():
    from train.evaluate import confusion_summary, format_summary

    truth = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    guess = ["a"] * 4 + ["a", "a", "c", "b"] + ["c", "c"]
    s = confusion_summary(truth, guess)
    assert s["accuracy"] == 0.7
    assert s["worst_intents"][0] == {"intent": "b", "n": 4, "accuracy": 0.25}
    assert s["most_confused"][0] == {"true": "b", "predicted": "a", "count": 2}
    assert s["errors"] == {"b": {"a": 2, "c": 1}}
    assert "b -> a x2" in format_summary(s)
