"""Harden the HAProxy config that Ray Serve 2.60 generates for its fast ingress.

Ray renders HAProxy's config from a fixed template and offers environment variables for a few
values only (ports, `timeout client`, maxconn). It has no setting for the request-phase timeout,
for request buffering, for the address of the stats and Prometheus listeners (`*`) or for the
admin socket's mode (666, level admin). What it does offer is RAY_SERVE_HAPROXY_BINARY_PATH:
serve/ingress.py points it at a two-line script that runs this file, which hardens the config
Ray passes with `-f` in place and then execs the real HAProxy on it (the same path on the command
line, which Ray's reload logic uses to recognise its own HAProxy processes).

What changes (settings from the environment, set by serve/ingress.py; defaults in DEFAULTS):
- on the HTTP frontend (not gRPC): `timeout http-request` + `option http-buffer-request`: headers
  and body (up to tune.bufsize, which serve/ingress.py raises above max_body_bytes) must arrive
  within TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S before a replica sees the request (a stalled or
  slow client holds an HAProxy connection, never a replica slot), else 408; `timeout client`
  TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S instead of Ray's 3600 s;
- at most TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT concurrent connections per client address, except
  from the addresses in TEXTSERVE_INGRESS_CAP_EXEMPT (this host's own 127.0.0.1 and ::1 by default:
  a load test or a local reverse proxy on the host itself; other loopback addresses and every
  remote client stay capped);
- `X-Textserve-Client: <peer address>` set on every request (a client's own value is replaced),
  with `X-Textserve-Ingress: <TEXTSERVE_INGRESS_SECRET>` so a replica trusts it only from us:
  the only client identity the app uses (feedback rate limit);
- stats, Prometheus listeners bound to TEXTSERVE_INGRESS_ADMIN_BIND (127.0.0.1), admin socket 0600;
- HAProxy's own 400/408/500/502/503/504 answers in the app's JSON error shape, 503 with
  Retry-After, and Serve's own plain-text 408/500/503/504 (request timeout, backpressure)
  rewritten to JSON; header values with control characters refused at the ingress (400);
- without TEXTSERVE_INGRESS_FALLBACK=1, the `backup` server (Serve's Python proxy) is disabled:
  with no healthy replica HAProxy answers 503 at once instead of parking requests there.
- a backend that a reload renders with no replica keeps the replica servers of the last
  rendering that listed some (still health-checked), in every reload within
  TEXTSERVE_INGRESS_REBUILD_CARRY_S seconds from the first empty rendering (the window is checked
  at reloads: the first reload after it drops them): Serve 2.60 renders an application's backend empty for
  a moment during a `serve deploy` (while it rebuilds the application, and at the start of a
  rolling update), although the old replicas keep running until new ones replace them; without
  this every deploy answers 503 for seconds (docs/SCALING.md, "Upgrades").
- without TEXTSERVE_INGRESS_ACCESS_LOG=1, the global `log` target (Ray's access log: a syslog
  datagram per request to RAY_SERVE_HAPROXY_LOG_TARGET, 127.0.0.1:514 by default) is commented
  out, as the app's `enable_access_log: false` says; Ray's metrics socket line stays.

Standard library only: it runs at every HAProxy start and reload.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

CLIENT_HEADER = "X-Textserve-Client"
SECRET_HEADER = "X-Textserve-Ingress"  # proves to a replica that CLIENT_HEADER came from our HAProxy
DEFAULTS = {
    "TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S": "10",  # whole headers + body; a 64 KB body needs far less
    "TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S": "30",  # client silent this long mid-request: cut
    "TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT": "256",  # HAProxy's maxconn is 4096: one address gets 1/16
    # The host itself is not a hostile client: Apache Bench's 400 users (the 2017 study's test) come
    # from 127.0.0.1. Empty: no exemption (every address capped).
    "TEXTSERVE_INGRESS_CAP_EXEMPT": "127.0.0.1 ::1",
    "TEXTSERVE_INGRESS_ADMIN_BIND": "127.0.0.1",
    "TEXTSERVE_INGRESS_FALLBACK": "0",
    "TEXTSERVE_INGRESS_ACCESS_LOG": "0",
    # How long a backend rendered empty keeps the replicas of the last rendering that listed some:
    # longer than an application build, short enough that replicas really gone are dropped (0: never).
    "TEXTSERVE_INGRESS_REBUILD_CARRY_S": "30",
}
_INT_SETTINGS = ("TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S", "TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S",
                 "TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT")
_WHOLE_SETTINGS = ("TEXTSERVE_INGRESS_REBUILD_CARRY_S",)  # 0 allowed
REPLICA_SERVER = "server SERVE_REPLICA"  # how Ray names a replica's server line
CARRY_FILE = "textserve-replica-servers.json"  # the last rendering's replica servers per backend
# HAProxy's own answers (errorfile), and plain-text answers from Serve turned into JSON (http-response).
_ERRORS = {
    400: ("Bad Request", "bad_request", "the request is not valid HTTP/1.1", None),
    405: ("Method Not Allowed", "method_not_allowed", "the API uses GET and POST", None),
    408: ("Request Timeout", "request_timeout", "the request did not arrive complete in time", None),
    500: ("Internal Server Error", "internal_error", "internal error in the serving system; it is logged", None),
    502: ("Bad Gateway", "replica_failed", "the replica failed while answering; retry", "1"),
    503: ("Service Unavailable", "no_replica", "no replica is ready to answer; retry shortly", "1"),
    504: ("Gateway Timeout", "timeout", "the replica did not answer in time", None),
}
_SERVE_TEXT = {  # status -> (code, message, Retry-After) for Serve's own plain-text answers
    408: ("timeout", "the request took longer than the configured request timeout", None),
    500: ("internal_error", "internal error in the serving system; it is logged", None),
    503: ("overloaded", "too many requests are waiting; retry shortly", "1"),
    504: ("timeout", "the replica did not answer in time", None),
}


_FLAG_SETTINGS = ("TEXTSERVE_INGRESS_FALLBACK", "TEXTSERVE_INGRESS_ACCESS_LOG")


def setting(name: str, env=os.environ) -> str:
    value = env.get(name, DEFAULTS[name])
    if name in _INT_SETTINGS and not (value.isdigit() and int(value) > 0):
        raise ValueError(f"{name}={value!r}: give a whole number above 0 (default {DEFAULTS[name]})")
    if name in _WHOLE_SETTINGS and not value.isdigit():
        raise ValueError(f"{name}={value!r}: give a whole number of seconds, 0 or more (default {DEFAULTS[name]})")
    if name in _FLAG_SETTINGS and value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: give 1 (on) or 0 (off) (default {DEFAULTS[name]})")
    if name == "TEXTSERVE_INGRESS_CAP_EXEMPT":
        return " ".join(_addresses(name, value))
    return value


def _addresses(name: str, value: str) -> list[str]:
    """Addresses or networks (CIDR), separated by spaces or commas, each checked."""
    import ipaddress

    out = []
    for item in value.replace(",", " ").split():
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{name}={value!r}: {item!r} is not an IP address or network; give addresses "
                             f"or CIDRs separated by spaces (default {DEFAULTS[name]!r}, empty: none)") from None
    return out


def _json_error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def error_page(status: int) -> bytes:
    reason, code, message, retry_after = _ERRORS[status]
    body = _json_error(code, message)
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Cache-Control: no-cache", "Connection: close"]
    if retry_after:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def write_error_pages(folder: Path) -> None:
    """The JSON pages the hardened config names, (re)written atomically at every start."""
    pages = {f"textserve-{status}.http": error_page(status) for status in _ERRORS}
    pages.update({f"textserve-serve-{status}.json": _json_error(code, message)
                  for status, (code, message, _) in _SERVE_TEXT.items()})
    pages["textserve-414.json"] = _json_error("uri_too_long", "the request target is longer than 8192 bytes")
    for name, content in pages.items():
        tmp = folder / f".{name}.{os.getpid()}"
        tmp.write_bytes(content)
        os.replace(tmp, folder / name)


def harden(config: str, error_dir: str, env=os.environ) -> str:
    """The hardened text of one generated config (idempotent: hardening twice changes nothing more)."""
    if "# textserve-hardened" in config:
        return config
    admin = setting("TEXTSERVE_INGRESS_ADMIN_BIND", env)
    request_timeout = int(setting("TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S", env))
    client_timeout = int(setting("TEXTSERVE_INGRESS_CLIENT_TIMEOUT_S", env))
    per_client = int(setting("TEXTSERVE_INGRESS_MAX_CONN_PER_CLIENT", env))
    exempt = setting("TEXTSERVE_INGRESS_CAP_EXEMPT", env)
    keep_fallback = setting("TEXTSERVE_INGRESS_FALLBACK", env) == "1"
    access_log = setting("TEXTSERVE_INGRESS_ACCESS_LOG", env) == "1"
    secret = env.get("TEXTSERVE_INGRESS_SECRET", "")
    folder = Path(error_dir)
    out, section = ["# textserve-hardened (serve/haproxy_hardening.py)"], ""
    for line in config.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "global" and stripped.startswith("stats socket "):
            line = re.sub(r"\bmode \d+", "mode 600", line)
        elif section == "global" and stripped.startswith("log ") and not access_log:
            # Ray's access log: one syslog datagram per request (to 127.0.0.1:514 unless
            # RAY_SERVE_HAPROXY_LOG_TARGET says otherwise), whatever the app's enable_access_log.
            line = "    # access log off (TEXTSERVE_INGRESS_ACCESS_LOG=1 keeps it): " + stripped
        elif section == "defaults" and stripped.startswith("errorfile "):
            continue  # ours below
        elif section in ("frontend prometheus", "listen stats") and stripped.startswith("bind "):
            port = stripped.split()[1].rsplit(":", 1)[1]
            line = f"    bind {admin}:{port}"
        elif section.startswith("backend ") and stripped.startswith("server ") and stripped.endswith(" backup") \
                and not keep_fallback:
            # Kept (routing rules may name it) but never used: with no replica, 503 at once.
            line = line + " disabled"
        elif section == "frontend http_frontend" and stripped.startswith("bind ") and " proto " not in line:
            # HTTP/1 only: h2c would carry ~100 requests per connection past the per-client cap.
            line = line + " proto h1"
        out.append(line)
        if stripped == "defaults":
            out += [f"    errorfile {status} {folder / f'textserve-{status}.http'}" for status in _ERRORS]
        elif section == "frontend http_frontend" and stripped.startswith("bind "):
            out += [f"    timeout client {client_timeout}s",
                    f"    timeout http-request {request_timeout}s",
                    "    option http-buffer-request",
                    "    stick-table type ipv6 size 100k expire 60s store conn_cur",
                    "    tcp-request connection track-sc0 src",
                    f"    tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}"
                    + (f" !{{ src {exempt} }}" if exempt else ""),
                    # Control characters in a header value (RFC 9110 forbids them; HAProxy lets
                    # some through) would make the replica's HTTP parser answer plain text.
                    r"    http-request deny deny_status 400 if { req.hdrs -m reg [\x01-\x08\x0b\x0c\x0e-\x1f\x7f] }",
                    # What the replicas' HTTP server would refuse in plain text: other methods,
                    # protocol upgrades (WebSocket), very long request targets.
                    "    http-request deny deny_status 405 unless { method GET HEAD POST PUT DELETE OPTIONS PATCH }",
                    "    http-request deny deny_status 400 if { req.hdr(upgrade) -m found }",
                    f"    http-request return status 414 content-type application/json file {folder / 'textserve-414.json'}"
                    " if { url_len gt 8192 }",
                    f"    http-request set-header {CLIENT_HEADER} %[src]",
                    f"    http-request set-header {SECRET_HEADER} {secret}" if secret else
                    f"    http-request del-header {SECRET_HEADER}"]
            for status, (_, _, retry_after) in _SERVE_TEXT.items():
                out.append(f"    http-response return status {status} content-type application/json "
                           f"file {folder / f'textserve-serve-{status}.json'}"
                           + (f" hdr Retry-After {retry_after}" if retry_after else "")
                           + f" if {{ status {status} }} !{{ res.hdr(content-type) -m sub json }}")
    return "\n".join(out) + "\n"


CARRIED_NOTE = "    # replicas kept from the previous rendering while the application rebuilds"


def _backend_servers(lines: list[str]) -> dict[str, list[str]]:
    """Each application backend's replica server lines, by backend name (lines this module carried
    over into a config, after CARRIED_NOTE, are not Ray's and do not count)."""
    servers, section, carried = {}, "", False
    for line in lines:
        if line and not line[0].isspace():
            section, carried = line.strip(), False
            if section.startswith("backend ") and section != "backend default_backend":
                servers[section] = []
        elif line == CARRIED_NOTE:
            carried = True
        elif section in servers and not carried and line.strip().startswith(REPLICA_SERVER):
            servers[section].append(line)
    return servers


def carry_servers(config: str, state_path: Path, carry_s: float, now: float) -> str:
    """`config` with a backend rendered without replicas given back the replica servers of the
    last rendering that listed some, for `carry_s` seconds from the first rendering without them;
    `state_path` keeps each backend's last non-empty server lines and since when it is empty."""
    if CARRIED_NOTE in config:  # carried over already (the wrapper run twice on one rendering)
        return config
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    lines = config.splitlines()
    current = _backend_servers(lines)
    carried = {}
    for name, found in current.items():
        if found:
            state[name] = {"servers": found, "empty_since": None}
        elif name in state:
            since = state[name]["empty_since"]
            if since is None or since > now:
                since = state[name]["empty_since"] = now
            if now - since <= carry_s:
                carried[name] = state[name]["servers"]
    state = {name: kept for name, kept in state.items() if name in current}
    tmp = state_path.with_name(f".{state_path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)
    if not carried:
        return config
    note = CARRIED_NOTE
    out, section = [], ""
    for line in lines:
        if line and not line[0].isspace():
            if section in carried:  # end of a carried backend: its servers go last
                out += [note, *carried[section]]
            section = line.strip()
        out.append(line)
    if section in carried:
        out += [note, *carried[section]]
    return "\n".join(out) + "\n"


def harden_in_place(args: list[str], env=os.environ) -> None:
    """Harden the config HAProxy is started with (`-f CONFIG`), in place.

    In place, not a copy: Ray recognises its HAProxy processes by the config path on their
    command line (to signal old workers on reload), so the path must stay the one Ray wrote."""
    if "-f" not in args:
        return
    source = Path(args[args.index("-f") + 1])
    write_error_pages(source.parent)
    text = source.read_text()
    hardened = harden(text, str(source.parent), env)
    carry_s = int(setting("TEXTSERVE_INGRESS_REBUILD_CARRY_S", env))
    if carry_s and "-c" not in args:  # a check run (-c) renders nothing HAProxy will serve
        import time

        try:
            hardened = carry_servers(hardened, source.parent / CARRY_FILE, carry_s, time.time())
        except (OSError, ValueError, KeyError, TypeError) as err:  # never keep HAProxy from starting
            print(f"haproxy_hardening: replicas not carried over ({err!r})", file=sys.stderr)
    if hardened != text:
        tmp = source.with_name(f".{source.name}.{os.getpid()}")
        tmp.write_text(hardened)
        os.replace(tmp, source)


def die_with_parent() -> None:
    """Linux: the HAProxy this process becomes gets SIGKILL when the process that started it (Ray's
    HAProxyManager actor) dies. Without it an HAProxy outlives a killed actor, `ray stop` does not
    know it (it is no Ray process), and a node keeps serving on a stale config and holding the
    port its replacement needs. The setting survives the exec below. Linux ties it to the thread
    that forked: Ray starts HAProxy from the actor's event-loop thread, which lives as long as the
    actor (tests/test_ingress_units.py checks the process case)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"haproxy_hardening: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()})", file=sys.stderr)
    elif os.getppid() != parent:  # the parent died before the setting took effect
        sys.exit("haproxy_hardening: the process that started HAProxy is gone; not starting it")


def main(argv: list[str]) -> None:
    real = os.environ.get("TEXTSERVE_HAPROXY_REAL_BINARY")
    if not real:
        sys.exit("haproxy_hardening: TEXTSERVE_HAPROXY_REAL_BINARY is not set (serve/ingress.py sets it)")
    harden_in_place(argv[1:])
    die_with_parent()
    os.execv(real, [real, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv)
