"""python -m online_learning send ...: see online_learning/send.py."""

import sys

from online_learning.send import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "send":
        print("usage: python -m online_learning send [--file FILE | --text T --label L] [--url URL] [--token T]")
        sys.exit(2)
    sys.exit(main(args[1:]))
