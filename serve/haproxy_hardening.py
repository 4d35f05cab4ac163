"""Harden the HAProxy config that Ray Serve 2.60 generates for its fast ingress.

Ray renders HAProxy's config from a fixed template and offers environment variables for a few
values only (ports, `timeout client`, maxconn). It has no setting for the request-phase timeout,
for request buffering, for the address of the stats and Prometheus listeners (`*`) or for the
admin socket's mode (666, level admin). What it does offer is RAY_SERVE_HAPROXY_BINARY_PATH:
serve/ingress.py points it at a two-line script that runs this file, which rewrites the config
Ray passes with `-f` into `<config>.hardened` and then execs the real HAProxy on it. Ray's own
file is left untouched, so its reload logic sees what it wrote.

What changes (settings from the environment, set by serve/ingress.py; defaults in DEFAULTS):
- `timeout http-request` + `option http-buffer-request`: headers and body must arrive complete
  within TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S before a replica sees the request (a stalled or
  slow client holds an HAProxy connection, never a replica slot), else 408;
- at most TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT concurrent connections per client address;
- `X-Textserve-Client: <peer address>` set on every request (a client's own value is replaced):
  the only client identity the app trusts (feedback rate limit);
- stats, Prometheus listeners bound to TEXTSERVE_INGRESS_ADMIN_BIND (127.0.0.1), admin socket 0600;
- HAProxy's own 400/408/502/503/504 answers in the app's JSON error shape, 503 with Retry-After;
  header values with control characters refused at the ingress (400) before a replica parses them;
- without TEXTSERVE_INGRESS_FALLBACK=1, no `backup` server: with no healthy replica HAProxy
  answers 503 at once instead of parking requests on Serve's Python proxy until one comes back.

Standard library only: it runs at every HAProxy start and reload.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

CLIENT_HEADER = "X-Textserve-Client"
DEFAULTS = {
    "TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S": "10",  # whole headers + body; a 64 KB body needs far less
    "TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S": "30",  # client silent this long mid-request: cut
    "TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT": "1024",  # above the bench's 400 users from one address
    "TEXTSERVE_INGRESS_ADMIN_BIND": "127.0.0.1",
    "TEXTSERVE_INGRESS_FALLBACK": "0",
}
_ERRORS = {
    400: ("Bad Request", "bad_request", "the request is not valid HTTP/1.1", None),
    408: ("Request Timeout", "request_timeout", "the request did not arrive complete in time", None),
    502: ("Bad Gateway", "replica_failed", "the replica failed while answering; retry", "1"),
    503: ("Service Unavailable", "no_replica", "no replica is ready to answer; retry shortly", "1"),
    504: ("Gateway Timeout", "timeout", "the replica did not answer in time", None),
}


def setting(name: str, env=os.environ) -> str:
    return env.get(name, DEFAULTS[name])


def error_page(status: int) -> bytes:
    reason, code, message, retry_after = _ERRORS[status]
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache", "Connection: close"]
    if retry_after:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def harden(config: str, error_dir: str, env=os.environ) -> str:
    """The hardened text of one generated config (idempotent: hardening twice changes nothing more)."""
    if "# textserve-hardened" in config:
        return config
    admin = setting("TEXTSERVE_INGRESS_ADMIN_BIND", env)
    request_timeout = int(setting("TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S", env))
    client_timeout = int(setting("TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S", env))
    per_client = int(setting("TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT", env))
    keep_fallback = setting("TEXTSERVE_INGRESS_FALLBACK", env) == "1"
    out, section = ["# textserve-hardened (serve/haproxy_hardening.py)"], ""
    for line in config.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "global" and stripped.startswith("stats socket "):
            line = re.sub(r"\bmode \d+", "mode 600", line)
        elif section == "defaults" and re.match(r"timeout (client|http-request) ", stripped):
            continue  # ours below
        elif section == "defaults" and stripped.startswith("errorfile "):
            continue  # ours below
        elif section in ("frontend prometheus", "listen stats") and stripped.startswith("bind "):
            port = stripped.split()[1].rsplit(":", 1)[1]
            line = f"    bind {admin}:{port}"
        elif section.startswith("backend ") and " backup" in stripped and stripped.startswith("server ") \
                and not keep_fallback:
            continue
        out.append(line)
        if stripped == "defaults":
            out += [f"    timeout client {client_timeout}s",
                    f"    timeout http-request {request_timeout}s",
                    "    option http-buffer-request"]
            out += [f"    errorfile {status} {Path(error_dir) / f'textserve-{status}.http'}" for status in _ERRORS]
        elif section == "frontend http_frontend" and stripped.startswith("bind "):
            out += ["    stick-table type ipv6 size 100k expire 60s store conn_cur",
                    "    tcp-request connection track-sc0 src",
                    f"    tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}",
                    f"    http-request set-header {CLIENT_HEADER} %[src]",
                    # Control characters in a header value (RFC 9110 forbids them; HAProxy lets
                    # some through) would make the replica's HTTP parser answer plain text.
                    r"    http-request deny deny_status 400 if { req.hdrs -m reg [\x01-\x08\x0b\x0c\x0e-\x1f\x7f] }"]
    return "\n".join(out) + "\n"


def rewrite_args(args: list[str], env=os.environ) -> list[str]:
    """HAProxy's arguments with `-f CONFIG` pointing at a hardened copy (written next to it)."""
    if "-f" not in args:
        return list(args)
    i = args.index("-f") + 1
    source = Path(args[i])
    for status in _ERRORS:
        page = source.parent / f"textserve-{status}.http"
        if not page.exists():
            page.write_bytes(error_page(status))
    hardened = source.with_name(source.name + ".hardened")
    tmp = hardened.with_name(hardened.name + f".{os.getpid()}")
    tmp.write_text(harden(source.read_text(), str(source.parent), env))
    os.replace(tmp, hardened)
    return [*args[:i], str(hardened), *args[i + 1:]]


def main(argv: list[str]) -> None:
    real = os.environ.get("TEXTSERVE_HAPROXY_REAL_BINARY")
    if not real:
        sys.exit("haproxy_hardening: TEXTSERVE_HAPROXY_REAL_BINARY is not set (serve/ingress.py sets it)")
    os.execv(real, [real, *rewrite_args(argv[1:])])


if __name__ == "__main__":
    main(sys.argv)
