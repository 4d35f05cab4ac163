"""python -m serve run [CONFIG]: `serve run` with the hardened fast ingress switched on.

The fast ingress (throughput-optimised Serve + HAProxy) must be in the environment of the
process that starts Ray; this sets it, hardened (serve/ingress.py: request timeouts, per-client
connection cap, loopback-only admin listeners, a private folder for HAProxy's files), and hands
over to Ray's own `serve run`, so every `serve run` option works after the config. On exit it
stops the HAProxy that Ray may leave behind and removes HAProxy's folder.

python -m serve env [DIR]: print those variables as `export` lines, for a plain `serve run` or
`ray start` in a shell (HAProxy's files then go to DIR, default /tmp/textserve-ingress).

The local Ray that `serve run` starts requires Ray's token (Ray 2.60 turns token authentication
on for local instances and keeps the token in ~/.ray/auth_token), and a CLI in another shell sends
it only with RAY_AUTH_MODE=token; `python -m serve run` prints that line when it starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import shlex

from serve.ingress import HardenedIngress, fast_ingress_env

DEFAULT_CONFIG = "cluster/serve_local.yaml"


def auth_hint() -> str | None:
    """How another shell's `serve status` / `ray status` / dashboard get Ray's token; None when off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the same RAY_AUTH_TOKEN as this shell"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"export RAY_AUTH_TOKEN_PATH={shlex.quote(os.environ['RAY_AUTH_TOKEN_PATH'])}"
    else:
        where = "token in ~/.ray/auth_token, which Ray writes on its first start"
    return ("Ray token authentication is on. For serve status, ray status and ray job in another shell:\n"
            f"  export RAY_AUTH_MODE=token      # {where}\n"
            "  the dashboard (its address follows below) asks for the token: `ray get-auth-token` prints it")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "env":
        env = fast_ingress_env(argv[1] if len(argv) > 1 else "/tmp/textserve-ingress")
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "run":
        print(__doc__.strip() + f"\n\nusage: python -m serve run [CONFIG (default {DEFAULT_CONFIG})] [serve run options]"
              "\n       python -m serve env [DIR]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    rest = argv[1:]
    if not rest or rest[0].startswith("-"):
        rest = [DEFAULT_CONFIG, *rest]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow C++ start-up chatter
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if hint := auth_hint():
        print(hint, flush=True)
    with HardenedIngress() as ingress_env:
        # A shell's background job starts with SIGINT ignored, and a child inherits that: give
        # serve run Ctrl-C's default back so the SIGINT passed on below stops it.
        child = subprocess.Popen([serve_cli, "run", *rest], env={**os.environ, **ingress_env},
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for sig in (signal.SIGINT, signal.SIGTERM):  # pass Ctrl-C / kill on to serve run
            signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
