"""The bundled corpus expands deterministically; bad user files stop with the file and row named."""

from __future__ import annotations

from collections import Counter

import pytest

from tests._helpers import write_jsonl
from train.data import DataFileError, DataSpec, intent_examples, load_dataset, read_user_file


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
