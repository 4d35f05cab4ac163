"""The robustness set and the training augmentation: deterministic, label-preserving, disjoint."""

import random

import pytest

from train import augment as aug
from train import robustness
from train.data import DataSpec, Example, load_dataset
from train.perturb import add_typos, find_values, move_place, number_words, numbers_as_words, replace_values


def test_number_words():
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 100, 215, 999)] == [
        "zero", "seven", "thirteen", "twenty", "forty two", "one hundred", "two hundred fifteen",
        "nine hundred ninety nine"]
    with pytest.raises(ValueError):
        number_words(1000)


def test_numbers_as_words_leaves_fractions_and_long_numbers():
    assert numbers_as_words("set the timer for 5 minutes and 30 seconds") == \
        "set the timer for five minutes and thirty seconds"
    assert numbers_as_words("brightness to 40%") == "brightness to forty%"
    assert numbers_as_words("add 1/2 minute") is None
    assert numbers_as_words("set it to 5100 kelvin") is None


def test_typos_change_one_word_and_keep_the_first_letter():
    rng = random.Random(0)
    for _ in range(50):
        out = add_typos("turn on the kitchen light", rng)
        assert out is not None and out != "turn on the kitchen light"
        changed = [(a, b) for a, b in zip("turn on the kitchen light".split(), out.split()) if a != b]
        assert len(changed) == 1 and changed[0][0][0] == changed[0][1][0]
    assert add_typos("is it on", random.Random(0)) is None  # no word of 4+ letters


def test_move_place_and_find_values():
    assert move_place("turn on the light in the kitchen") == "in the kitchen turn on the light"
    assert move_place("turn on the light") is None
    assert move_place("set the timer in the kitchen to 5") is None  # the place phrase must end the text
    assert find_values("turn on the kitchen light in the kitchen", ["kitchen", "kitchen light"]) == [
        (12, 25, "kitchen light"), (33, 40, "kitchen")]
    assert replace_values("open the garage door", ["garage"], lambda v, r: "X", random.Random(0)) == "open the X door"
    assert replace_values("open the garagedoor", ["garage"], lambda v, r: "X", random.Random(0)) is None


@pytest.fixture(scope="module")
def english():
    return load_dataset(DataSpec(langs=("en",), seed=0))


def test_robustness_set_is_deterministic_and_keeps_labels(english):
    first = robustness.robustness_set(english.test, seed=0)
    again = robustness.robustness_set(english.test, seed=0)
    assert first == again
    assert {p.kind for p in first} == set(robustness.KINDS)
    by_text = {e.text: e for e in english.test}
    for p in first:
        source = by_text[p.source]
        assert p.example.label == source.label and p.example.text != source.text
    assert len([p for p in first if p.kind == "padding"]) == len(english.test)
    other = robustness.robustness_set(english.test, seed=1)
    assert [p.example.text for p in other] != [p.example.text for p in first]


def test_robustness_names_are_unseen_in_training(english):
    train_words = {w for e in english.train for w in e.text.split()}
    augmented = aug.augment(english.train, 0, aug.KINDS)
    augmented_words = {w for e in augmented for w in e.text.split()}
    names = [p for p in robustness.robustness_set(english.test, seed=0, kinds=("names",))]
    assert names
    new_words = set()
    for p in names:
        new_words |= set(p.example.text.split()) - set(p.source.split())
    assert new_words and not new_words & train_words
    assert len(new_words & augmented_words) <= len(new_words) // 50  # made-up words: a rare chance collision


def test_robustness_and_augmentation_phrases_are_disjoint():
    assert not set(robustness._PREFIXES) & set(aug._PREFIXES)
    assert not {s.strip() for s in robustness._SUFFIXES} & {s.strip() for s in aug._SUFFIXES}
    assert not set(robustness._OWNERS) & set(aug._OWNERS)


def test_augment_appends_labelled_copies(english):
    base = english.train
    out = aug.augment(base, 0, ("names", "padding", "typos"))
    assert out[: len(base)] == base and len(out) > len(base)
    assert out == aug.augment(base, 0, ("names", "padding", "typos"))
    texts = {e.text: e.label for e in base}
    groups = {e.group: e.label for e in base}
    for e in out[len(base):]:
        assert e.text not in texts or texts[e.text] == e.label
        assert groups[e.group] == e.label
    assert aug.augment(base, 0, ()) == base


def test_augment_non_english_masks_names_only():
    ko = [Example("거실 조명 켜줘", "HassTurnOn", "ko", "ko:HassTurnOn:0:0")]
    out = aug.augment(ko, 0, ("padding", "typos"))
    assert out == ko


def test_parse_kinds_and_dataspec_check():
    assert aug.parse_kinds("names+padding") == ("names", "padding")
    assert aug.parse_kinds("none") == ()
    for bad in ("names+names", "nams", "names,padding"):
        with pytest.raises(ValueError):
            aug.parse_kinds(bad)
    with pytest.raises(ValueError, match="augment kinds"):
        DataSpec(augment="shout")


def test_cli_defaults_are_the_measured_ones():
    from train.cli import parse_args
    from train.job import DEFAULT_ARCH

    cfg = parse_args([])
    assert DEFAULT_ARCH == "cnn" and cfg.arch is None  # None: a new model is a cnn, a fine-tune keeps its base's
    assert cfg.data.augment == "names+padding+typos"
    assert parse_args(["--augment", "none", "--arch", "lstm"]).data.augment == "none"


def test_versions_recorded_without_augment_rebuild_unaugmented():
    from train.data import spec_from_record

    assert spec_from_record({"langs": ["en"], "split": "template"}).augment == "none"
    assert spec_from_record({"langs": ["en"], "augment": "names"}).augment == "names"
