"""python -m online_learning send ...: see online_learning/send.py."""

import sys

from online_learning.send import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "status":  # python -m online_learning status: see online_learning/status_view.py
        from online_learning.status_view import main as status_main

        sys.exit(status_main(args[1:]))
    if not args or args[0] != "send":
        print("usage: python -m online_learning send [--file FILE | --text T --label L] [--url URL] [--token T]")
        sys.exit(2)
    sys.exit(main(args[1:]))
