"""python -m serve run [CONFIG]: `serve run` with the fast ingress switched on.

The fast ingress (throughput-optimised Serve + HAProxy) must be in the environment of the
process that starts Ray; this sets it (unless you set those variables yourself) and hands over
to Ray's own `serve run` (stopping the HAProxy it may leave behind on exit), so every `serve run` option works after the config.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from serve.haproxy_cleanup import haproxy_pids, stop_new_haproxy
from serve.settings import FAST_INGRESS_ENV

DEFAULT_CONFIG = "cluster/serve_local.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "run":
        print(__doc__.strip() + f"\n\nusage: python -m serve run [CONFIG (default {DEFAULT_CONFIG})] [serve run options]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    rest = argv[1:]
    if not rest or rest[0].startswith("-"):
        rest = [DEFAULT_CONFIG, *rest]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow C++ start-up chatter
    for key, value in FAST_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    before = haproxy_pids()
    child = subprocess.Popen([serve_cli, "run", *rest])
    for sig in (signal.SIGINT, signal.SIGTERM):  # pass Ctrl-C / kill on to serve run
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        stop_new_haproxy(before)


if __name__ == "__main__":
    sys.exit(main())
