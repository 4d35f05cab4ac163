"""python -m bench serving ...: see bench/serving.py."""

import sys

from bench.serving import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "serving":
        print("usage: python -m bench serving --store STORE [--variants ...] [--users 1,64,400]")
        sys.exit(2)
    sys.exit(main(args[1:]))
