"""python -m bench compare|serving|freshness ...: see bench/compare.py, serving.py, freshness.py."""

import sys

COMMANDS = {"compare": "bench.compare", "serving": "bench.serving", "freshness": "bench.freshness"}

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m bench {{{','.join(COMMANDS)}}} --store STORE [options]; --help after the command")
        sys.exit(2)
    module = __import__(COMMANDS[args[0]], fromlist=["main"])
    sys.exit(module.main(args[1:]))
