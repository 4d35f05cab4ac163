"""Slot values for expanding the intent templates: a large generated pool, split three ways.

Home Assistant fills {area}, {name} and {floor} from a user's own home at run time, so at serving
time those words are mostly ones the training data never had. The pool here is generated
(seeded) from parts (room and device words, modifiers, brands, people's names), for English and
Korean, and split into disjoint train / validation / test parts: sentences in the validation and
test splits only ever carry values the training split never saw. The small hand-written list in
`slot_values.json` (what training used before) is always on the training side.

Number ranges (brightness 0..100, timer minutes...) are split the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

HELD_OUT_FRACTION = 0.15  # of the generated values, for validation and again for test

_EN_ROOMS = [
    "kitchen", "living room", "bedroom", "garage", "office", "bathroom", "hallway", "dining room",
    "attic", "basement", "laundry room", "study", "nursery", "playroom", "patio", "porch", "garden",
    "backyard", "front yard", "balcony", "pantry", "closet", "den", "library", "gym", "sunroom",
    "guest room", "mudroom", "workshop", "cellar", "loft", "foyer", "terrace", "deck", "shed",
    "family room", "media room", "game room", "music room", "utility room", "wine cellar", "entryway",
    "stairs", "landing", "spa", "pool house", "carport", "driveway", "lounge", "kids room",
]
_EN_ROOM_MODIFIERS = [
    "master", "guest", "main", "upstairs", "downstairs", "north", "south", "east", "west", "small",
    "big", "back", "front", "second", "spare", "old", "new", "lower", "upper", "emma's", "jack's",
    "noah's", "olivia's", "liam's", "mia's", "grandma's", "the kids'",
]
_EN_DEVICES = [
    "light", "lamp", "ceiling light", "desk lamp", "floor lamp", "light strip", "spotlight",
    "chandelier", "fan", "heater", "tv", "speaker", "door", "window", "blinds", "curtains", "shade",
    "garage door", "lock", "thermostat", "outlet", "plug", "switch", "sensor", "camera", "vacuum",
    "air purifier", "humidifier", "dehumidifier", "kettle", "coffee maker", "dishwasher", "washer",
    "dryer", "sprinkler", "fountain", "projector", "soundbar", "radiator", "bulb", "sconce", "pendant",
    "night light", "led strip", "lantern", "string lights", "gate", "awning", "skylight", "boiler",
]
_EN_DEVICE_PREFIXES = [
    "reading", "bedside", "corner", "accent", "main", "left", "right", "window", "desk", "porch",
    "tree", "christmas", "aquarium", "mirror", "cabinet", "island", "wall", "hue", "ikea", "sonos",
    "nest", "shelly", "tradfri", "govee", "lifx", "kasa", "wiz", "philips", "bose", "dyson", "roomba",
    "sofa", "bed", "piano", "stair", "closet", "garden", "pool", "patio", "deck", "shed", "fireplace",
    "emma's", "jack's", "noah's", "olivia's", "dad's", "mom's", "baby", "guest", "hallway", "kitchen",
]
_EN_FLOORS = [
    "first floor", "second floor", "third floor", "fourth floor", "ground floor", "upstairs",
    "downstairs", "basement", "top floor", "main floor", "lower level", "upper level", "mezzanine",
    "lower floor", "upper floor", "loft floor", "attic floor", "level one", "level two", "level three",
]

_KO_ROOMS = [
    "거실", "주방", "침실", "화장실", "사무실", "차고", "현관", "베란다", "안방", "작은방", "아이방",
    "서재", "다용도실", "드레스룸", "욕실", "부엌", "식당", "옷방", "창고", "복도", "계단", "마당",
    "정원", "테라스", "발코니", "다락방", "지하실", "손님방", "공부방", "놀이방", "세탁실", "팬트리",
    "작업실", "회의실", "거실 옆방", "뒷마당", "앞마당", "옥상", "주차장", "온실",
]
_KO_ROOM_MODIFIERS = ["큰", "작은", "안쪽", "바깥", "1층", "2층", "3층", "첫째", "둘째", "엄마", "아빠",
                      "민수", "지은", "할머니", "새", "뒤쪽", "앞쪽"]
_KO_DEVICES = [
    "조명", "전등", "스탠드", "무드등", "천장 조명", "선풍기", "에어컨", "티비", "텔레비전", "스피커",
    "커튼", "블라인드", "창문", "현관문", "도어락", "보일러", "히터", "가습기", "제습기", "공기청정기",
    "로봇청소기", "세탁기", "건조기", "전기밥솥", "커피머신", "플러그", "콘센트", "스위치", "센서",
    "카메라", "냉장고", "식기세척기", "환풍기", "수면등", "간접등", "형광등", "전구", "샹들리에",
    "펜던트등", "레일등",
]
_KO_DEVICE_PREFIXES = [
    "거실", "주방", "침대", "책상", "식탁", "벽", "창가", "현관", "욕실", "아이방", "안방", "서재",
    "복도", "베란다", "필립스", "샤오미", "삼성", "엘지", "다이슨", "이케아", "소파", "계단", "마당",
    "엄마", "아빠", "민수", "지은", "아기", "왼쪽", "오른쪽", "메인", "보조",
]
_KO_FLOORS = ["1층", "2층", "3층", "4층", "5층", "지하", "지하 1층", "지하 2층", "옥상", "다락", "위층",
              "아래층", "일층", "이층", "삼층", "꼭대기층", "지상층", "중간층"]

_PARTS = {
    "en": (_EN_ROOMS, _EN_ROOM_MODIFIERS, _EN_DEVICES, _EN_DEVICE_PREFIXES, _EN_FLOORS),
    "ko": (_KO_ROOMS, _KO_ROOM_MODIFIERS, _KO_DEVICES, _KO_DEVICE_PREFIXES, _KO_FLOORS),
}


def pseudo_word(rng: random.Random, lang: str) -> str:
    """A made-up word (a stand-in for a name nobody can list in advance: 'zorvi', '툰바')."""
    if lang == "ko":
        return "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(2, 3)))
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def generated_values(lang: str, seed: int) -> dict[str, list[str]]:
    """Realistic-looking generated values per slot (sorted, deduplicated); {} for other languages."""
    if lang not in _PARTS:
        return {}
    rooms, room_mods, devices, device_prefixes, floors = _PARTS[lang]
    rng = random.Random(f"slot-pool:{seed}:{lang}")
    areas = set(rooms) | {f"{m} {r}" for m in room_mods for r in rooms if rng.random() < 0.25}
    names = set(devices) | {f"{p} {d}" for p in device_prefixes for d in devices if rng.random() < 0.3}
    return {"area": sorted(areas), "name": sorted(names), "floor": sorted(set(floors))}


@dataclass(frozen=True)
class SlotPools:
    """Values per slot for each split; the three never share a value."""

    train: dict[str, list[str]]
    validation: dict[str, list[str]]
    test: dict[str, list[str]]

    def for_split(self, split: str) -> dict[str, list[str]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[split]


def slot_pools(lang: str, bundled: dict[str, list[str]], seed: int, mode: str) -> SlotPools:
    """Split the values of `lang` three ways.

    mode "generated": train on the bundled values plus the generated ones not held out;
    "generated+placeholders": that plus made-up words as names and areas; "bundled": train on the
    bundled values only (what training used before). Validation and test values are the same in
    every mode (held out from the generated pool, never a bundled value), so accuracies compare.
    """
    generated = generated_values(lang, seed)
    rng = random.Random(f"slot-split:{seed}:{lang}")
    train, validation, test = {}, {}, {}
    for slot in sorted(set(bundled) | set(generated)):
        mine = set(bundled.get(slot, []))
        candidates = sorted(set(generated.get(slot, [])) - mine)
        rng.shuffle(candidates)
        n = int(len(candidates) * HELD_OUT_FRACTION) if len(candidates) >= 6 else 0
        validation[slot], test[slot] = sorted(candidates[:n]), sorted(candidates[n : 2 * n])
        rest = candidates[2 * n :]
        train[slot] = sorted(mine | (set(rest) if mode != "bundled" else set()))
        if mode == "generated+placeholders" and slot in ("area", "name"):
            made_up = {pseudo_word(rng, lang) for _ in range(len(rest) // 2)}
            if slot == "name":  # "zorvi lamp": a made-up brand or nickname with a real device word
                devices = _PARTS.get(lang, ((), (), ["light"], (), ()))[2]
                made_up |= {f"{pseudo_word(rng, lang)} {rng.choice(devices)}" for _ in range(len(rest) // 2)}
            train[slot] = sorted(set(train[slot]) | (made_up - set(validation[slot]) - set(test[slot])))
        if not validation[slot]:  # too few values to hold any out: every split uses the same ones
            validation[slot] = test[slot] = train[slot]
    return SlotPools(train, validation, test)


def number_pools(numbers: list[int], seed: int, name: str) -> SlotPools:
    """A number range split three ways (values too few to split are shared)."""
    values = list(numbers)
    random.Random(f"number-split:{seed}:{name}").shuffle(values)
    n = int(len(values) * HELD_OUT_FRACTION) if len(values) >= 10 else 0
    if n == 0:
        return SlotPools({name: values}, {name: values}, {name: values})
    return SlotPools({name: sorted(values[2 * n :])}, {name: sorted(values[:n])}, {name: sorted(values[n : 2 * n])})
