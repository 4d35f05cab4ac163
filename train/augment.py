"""Training augmentation: extra copies of training sentences with what templates never show.

Kinds (DataSpec.augment, joined with "+", e.g. "names+padding"):

- `names`: slot masking. The training sentence's areas, device names and floors replaced by
  made-up words ("zorvi") or made-up words in front of the value's last word ("zorvi lamp"), so the
  model learns the intent from the words around the name rather than from the name;
- `padding`: a chatty prefix and/or suffix ("can you ...", "... thanks");
- `typos`: one keyboard slip in one word;
- `numbers`: numbers written as words;
- `order`: a trailing place phrase moved to the front.

Each kind adds a copy of a share (RATES) of the training sentences it applies to, seeded by
(seed, kind, sentence). Its phrases, owners and made-up words are disjoint from the robustness
set's (train/robustness.py). Languages other than English get `names` only.
"""

from __future__ import annotations

import random

from train.perturb import add_typos, move_place, numbers_as_words, pad, replace_values
from train.slot_pool import pseudo_word, slot_pools

KINDS = ("names", "padding", "typos", "numbers", "order")
RATES = {"names": 0.5, "padding": 0.25, "typos": 0.25, "numbers": 0.25, "order": 0.25}
_PREFIXES = ["can you", "kindly", "hey assistant", "would you", "i want you to", "yo", "listen,"]
_SUFFIXES = [" thanks", " for me", " now", " asap", " ok", " cheers"]
_OWNERS = ["ben's", "lily's", "omar's", "zoe's", "nina's", "ivan's", "uncle tom's"]


def parse_kinds(text: str) -> tuple[str, ...]:
    """"names+padding" -> ("names", "padding"); "" or "none" -> ()."""
    if text in ("", "none"):
        return ()
    kinds = tuple(k.strip() for k in text.split("+"))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"augment kinds must be distinct, from {list(KINDS)} joined with '+', got {text!r}")
    return kinds


def _masked_value(lang: str):
    def new_value(old: str, rng: random.Random) -> str:
        words = old.split()
        roll = rng.random()
        if len(words) > 1 and roll < 0.5:
            front = rng.choice(_OWNERS) if lang == "en" and roll < 0.15 else pseudo_word(rng, lang)
            return f"{front} {words[-1]}"
        return pseudo_word(rng, lang)
    return new_value


def augment(train: list, seed: int, kinds: tuple[str, ...], slots: str = "bundled") -> list:
    """`train` (Examples) followed by the augmented copies (in train order, kind by kind)."""
    if not kinds:
        return list(train)
    from train.data import Example, _slot_values  # train.data checks DataSpec.augment with parse_kinds

    values: dict[str, list[str]] = {}
    extra = []
    for kind in kinds:
        for example in train:
            lang = example.lang
            if lang != "en" and kind != "names":
                continue
            rng = random.Random(f"augment:{seed}:{kind}:{example.text}")
            if rng.random() >= RATES[kind]:
                continue
            if kind == "names":
                if lang not in values:
                    known = _slot_values()
                    pools = slot_pools(lang, known[lang], seed, slots).train if lang in known else {}
                    values[lang] = [v for vs in pools.values() for v in vs]
                text = replace_values(example.text, values[lang], _masked_value(lang), rng)
            elif kind == "padding":
                text = pad(example.text, rng, _PREFIXES, _SUFFIXES)
            elif kind == "typos":
                text = add_typos(example.text, rng)
            elif kind == "numbers":
                text = numbers_as_words(example.text)
            else:
                text = move_place(example.text)
            if text and text != example.text:
                extra.append(Example(text, example.label, example.lang, example.group))
    return list(train) + extra
