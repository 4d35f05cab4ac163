"""The robustness set: the template split's test sentences, perturbed in ways templates never show.

Each test sentence gives at most one variant per kind, seeded by (seed, kind, sentence):

- `names`: its areas, device names and floors (the test split's held-out slot values) replaced
  by names no split has: a made-up brand or another person's possessive in front of the value's
  last word ("bose ceiling light" -> "krenox light"), a made-up word for a one-word value;
- `typos`: one keyboard slip in one word of 4+ letters (two in sentences of 6+ words);
- `padding`: a polite or chatty prefix and/or suffix ("could you please ...", "... thank you");
- `numbers`: numbers written as words ("set it to 42" -> "set it to forty two");
- `order`: a trailing place phrase moved to the front ("in the kitchen turn on the light").

The phrases, owners and made-up words here are disjoint from what train/augment.py trains on, so
an augmented model is not scored on its own inputs. Languages other than English get `names` only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from train.data import Example, _slot_values
from train.perturb import add_typos, move_place, numbers_as_words, pad, replace_values
from train.slot_pool import slot_pools

KINDS = ("names", "typos", "padding", "numbers", "order")
_PREFIXES = ["could you please", "please", "hey, would you", "excuse me, can you", "i was wondering if you could",
             "sorry to bother you but", "okay so"]
_SUFFIXES = [" please", ", thank you", " if you don't mind", " right now please", " thanks a lot"]
_OWNERS = ["sophie's", "mateo's", "priya's", "kenji's", "amara's", "luca's", "grandpa's", "aunt rosa's", "rafael's"]
_ONSETS = ["br", "kr", "tr", "pl", "st", "sk", "gl", "fl", "qu", "zh", "dr", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["x", "n", "k", "r", "sh", "m", "ll", "th"]


@dataclass(frozen=True)
class Perturbed:
    example: Example  # the perturbed sentence and the original's label
    kind: str  # one of KINDS
    source: str  # the test sentence it came from


def unseen_word(rng: random.Random) -> str:
    """A made-up brand-like word of consonant clusters ("krenox", "plaishum")."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2))) + rng.choice(_CODAS)


def unseen_value(old: str, rng: random.Random) -> str:
    words = old.split()
    if len(words) == 1:
        return unseen_word(rng)
    front = rng.choice(_OWNERS) if rng.random() < 0.4 else unseen_word(rng)
    return f"{front} {words[-1]}"


def _perturb(example: Example, kind: str, values: list[str], rng: random.Random) -> str | None:
    text = example.text
    if kind == "names":
        return replace_values(text, values, unseen_value, rng)
    if kind == "typos":
        return add_typos(text, rng, 2 if len(text.split()) >= 6 else 1)
    if kind == "padding":
        return pad(text, rng, _PREFIXES, _SUFFIXES)
    if kind == "numbers":
        return numbers_as_words(text)
    if kind == "order":
        return move_place(text)
    raise ValueError(f"unknown perturbation {kind!r}; choose from {list(KINDS)}")


def robustness_set(test: list[Example], seed: int, kinds: tuple[str, ...] = KINDS) -> list[Perturbed]:
    """The perturbed variants of `test` (the template split's test set of `seed`), in test order."""
    held_out: dict[str, list[str]] = {}
    out = []
    for example in test:
        lang = example.lang
        if lang not in held_out:
            pools = slot_pools(lang, _slot_values()[lang], seed, "bundled").test if lang in _slot_values() else {}
            held_out[lang] = [v for vs in pools.values() for v in vs]
        for kind in kinds:
            if lang != "en" and kind != "names":
                continue
            rng = random.Random(f"robustness:{seed}:{kind}:{example.text}")
            text = _perturb(example, kind, held_out[lang], rng)
            if text and text != example.text:
                out.append(Perturbed(Example(text, example.label, lang, example.group), kind, example.text))
    return out
