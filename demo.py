"""`make demo`: the main job end to end on the embedded default (local Ray, local store, bundled data).

Trains the small model on English and Korean intents with Ray Train and publishes it to the
local model store, then prints where it went and how accurate it is.
"""

from __future__ import annotations

import sys

from train.__main__ import main as train_main


def main() -> int:
    print("== 1/1 train: Ray Train, small model, bundled English + Korean intents ==", flush=True)
    return train_main(["--size", "small", "--langs", "en,ko"])


if __name__ == "__main__":
    sys.exit(main())
