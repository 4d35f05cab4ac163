"""Sentence perturbations: swapped slot values, typos, padding, numbers as words, moved phrases.

Shared by the robustness set (train/robustness.py, perturbed held-out test sentences) and the
training augmentation (train/augment.py). Every function takes its random source, so callers
decide the seed; none of them changes the sentence's intent.
"""

from __future__ import annotations

import random
import re

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NUMBER = re.compile(r"(?<![\d/.])\d{1,3}(?![\d/.])")
# A phrase at the end that says where ("... in the kitchen"), moved to the front by move_place.
_TRAILING_PLACE = re.compile(r"^(?P<head>\S.*\S)\s+(?P<place>(?:in|on|at)\s+(?:the|my|our)\s+[^\d]+)$")


def number_words(n: int) -> str:
    """0..999 in English words: 42 -> "forty two", 100 -> "one hundred"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def numbers_as_words(text: str) -> str | None:
    """Every stand-alone number of up to 3 digits written in words; None when the text has none."""
    out = _NUMBER.sub(lambda m: number_words(int(m.group())), text)
    return out if out != text else None


def _neighbour(ch: str, rng: random.Random) -> str:
    for row in _KEYBOARD:
        i = row.find(ch)
        if i >= 0:
            return rng.choice([row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)])
    return ch


def typo_word(word: str, rng: random.Random) -> str:
    """One keyboard slip in a word of 4+ letters: two letters swapped, one dropped, doubled or
    replaced by a keyboard neighbour (never the first letter). Shorter words come back as they are."""
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "neighbour"))
    if kind == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    out = word[:i] + _neighbour(word[i], rng) + word[i + 1:]
    return out if out != word else word[:i] + word[i + 1:]


def add_typos(text: str, rng: random.Random, count: int = 1) -> str | None:
    """`count` words of 4+ letters with one slip each; None when the text has no such word."""
    words = text.split()
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return None
    for i in rng.sample(candidates, min(count, len(candidates))):
        words[i] = typo_word(words[i], rng)
    out = " ".join(words)
    return out if out != text else None


def pad(text: str, rng: random.Random, prefixes: list[str], suffixes: list[str]) -> str:
    """A polite or chatty prefix, suffix or both around the text."""
    where = rng.choice(("prefix", "suffix", "both"))
    out = text
    if where in ("prefix", "both"):
        out = rng.choice(prefixes) + " " + out
    if where in ("suffix", "both"):
        out = out + rng.choice(suffixes)
    return out


def move_place(text: str) -> str | None:
    """"turn on the light in the kitchen" -> "in the kitchen turn on the light"; None when the
    text does not end with such a phrase."""
    m = _TRAILING_PLACE.match(text)
    if not m or len(m.group("head").split()) < 2:  # "turn on the light": "on" belongs to the verb
        return None
    return f"{m.group('place')} {m.group('head')}"


def find_values(text: str, values: list[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, value) of the given values in the text, as whole words,
    longest values first."""
    taken: list[tuple[int, int, str]] = []
    lowered = text.lower()
    for value in sorted(set(values), key=lambda v: (-len(v), v)):
        for m in re.finditer(r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)", lowered):
            if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
                taken.append((m.start(), m.end(), value))
    return sorted(taken)


def replace_values(text: str, values: list[str], new_value, rng: random.Random) -> str | None:
    """Each occurrence of a value replaced by new_value(old, rng); None when none occurs."""
    found = find_values(text, values)
    if not found:
        return None
    out, last = [], 0
    for start, end, value in found:
        out += [text[last:start], new_value(value, rng)]
        last = end
    out.append(text[last:])
    return "".join(out)
