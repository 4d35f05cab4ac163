"""python -m train: train a classifier and publish it (train/cli.py), or `python -m train store
ls|gc` to show and clean the model store (train/store_cli.py), which starts in a second rather than
after importing Keras and Ray."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["store"]:
        from train.store_cli import main as store_main

        return store_main(argv[1:])
    from train.cli import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
