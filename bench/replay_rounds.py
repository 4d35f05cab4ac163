"""python -m bench replay_rounds STORE POLICIES_JSON: the learner's rounds replayed offline.

Replays the Korean training split (a tenth held out, as the gate would) against the newest
version in STORE with the learner's own `OnlineTrainer` (embedding 3e-3, dense 3e-4): rounds of
512 new events with 2 replayed per new event, then N replay-only follow-up rounds of 512, each
with base rehearsal at `ratio` (default 2.0) base examples per feedback example. No gate, no
Serve: seconds per policy. Prints one JSON line per policy: English test before/after, Korean
test at the end and after each round from the last new-event round on.

  python -m bench replay_rounds artifacts/models '{"f6": {"followups": 6}, "f24r3": {"followups": 24, "ratio": 3.0}}'
"""

from __future__ import annotations

import json
import random
import sys


def replay(store: str, followups: int, ratio: float = 2.0) -> dict:
    from online_learning.trainer import OnlineTrainer
    from train.data import DataSpec, load_dataset
    from train.model import accuracy
    from train.store import ModelStore

    en, ko = load_dataset(DataSpec(langs=("en",))), load_dataset(DataSpec(langs=("ko",)))

    def score(trainer):
        return [round(accuracy(trainer.loaded, [e.text for e in s.test], [e.label for e in s.test]), 4) for s in (en, ko)]

    split = random.Random(1)
    stream = [e for e in ko.train if split.random() >= 0.1]
    trainer = OnlineTrainer(ModelStore(store).load(), 3e-3, 3e-4)
    before = score(trainer)
    rng, earlier, trace = random.Random(0), [], []
    new_rounds = [stream[i:i + 512] for i in range(0, len(stream), 512)]
    for i, new in enumerate(new_rounds + [[]] * followups):
        replayed = rng.sample(earlier, min(max(128, 2 * len(new)) if new else 512, len(earlier)))
        base = rng.sample(en.train, min(max(32, int(ratio * (len(new) + len(replayed)))), len(en.train)))
        examples = [(e.text, e.label) for e in new + replayed + base]
        rng.shuffle(examples)
        trainer.train([t for t, _ in examples], [y for _, y in examples], 32)
        earlier += new
        if i >= len(new_rounds) - 1:
            trace.append(score(trainer)[1])
    after = score(trainer)
    return {"english": [before[0], after[0]], "korean": after[1], "korean_by_round": trace}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    for name, policy in json.loads(argv[1]).items():
        print(json.dumps({"policy": name, **replay(argv[0], policy["followups"], policy.get("ratio", 2.0))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
