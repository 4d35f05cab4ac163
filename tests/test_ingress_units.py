"""The HAProxy hardening on a config shaped like Ray 2.60's, checked by HAProxy itself (`-c`)."""

from __future__ import annotations

import json
import subprocess

import pytest

from pathlib import Path

from serve.haproxy_hardening import (CARRY_FILE, CLIENT_HEADER, DEFAULTS, SECRET_HEADER, carry_servers, harden,
                                     harden_in_place)
from serve.ingress import real_haproxy_binary
from online_learning.rate_limit import TokenBuckets

def ray_config(folder: Path, router: bool = False, replica_port: int = 30000, replicas: tuple[str, ...] = ("a",),
               **overrides) -> Path:
    """The config Ray 2.60's own HAProxyApi renders for one app with replicas (named `replicas`,
    on ports from `replica_port`) and the fallback proxy (`overrides`: HAProxyConfig fields, e.g.
    ports and the log target)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    servers = [ServerConfig(name=f"SERVE_REPLICA_{name}", host="127.0.0.1", port=replica_port + i, replica_id=name)
               for i, name in enumerate(replicas)]
    replica = servers[0] if servers else None
    backend = BackendConfig(name="http-app", path_prefix="/", app_name="app", servers=servers,
                            fallback_server=ServerConfig(name="SERVE_PROXY", host="127.0.0.1", port=8500),
                            ingress_request_router_servers=[replica] if router and replica else [])
    overrides.setdefault("http_options", HTTPOptions(host="127.0.0.1", port=18080))
    cfg = HAProxyConfig(socket_path=str(folder / "admin.sock"),
                        server_state_base=str(folder), server_state_file=str(folder / "server-state"),
                        metrics_socket_path=str(folder / "metrics.sock"), error_file_path=str(folder / "500.http"),
                        **overrides)
    (folder / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    api = HAProxyApi(cfg=cfg, backend_configs={"app": backend}, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


@pytest.fixture
def clean_env(monkeypatch):
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEXTSERVE_INGRESS_SECRET", "s3cret")


def haproxy_check(path: Path) -> None:
    check = subprocess.run([real_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_hardened_config_is_valid_and_closes_each_gap(tmp_path, clean_env):
    path = ray_config(tmp_path)
    original = path.read_text()
    assert "mode 666" in original and "bind *:8404" in original and " backup" in original  # the gaps
    harden_in_place(["-db", "-f", str(path)])  # the path HAProxy (and Ray's process checks) see stays
    text = path.read_text()
    haproxy_check(path)
    assert "mode 600 level admin" in text and "mode 666" not in text
    assert "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8404" in text and "bind *" not in text
    frontend = text[text.index("frontend http_frontend"):text.index("backend default_backend")]
    for rule in ("timeout http-request 10s", "option http-buffer-request", "timeout client 30s",
                 "sc0_conn_cur gt 256", f"set-header {CLIENT_HEADER} %[src]", f"set-header {SECRET_HEADER} s3cret",
                 "http-response return status 503"):
        assert rule in frontend, rule
    assert "check backup disabled" in text and f"{tmp_path}/500.http" not in text
    assert (tmp_path / "textserve-503.http").read_bytes().startswith(b"HTTP/1.1 503")
    assert harden(text, str(tmp_path)) == text  # idempotent


def test_ingress_request_router_config_stays_valid(tmp_path, clean_env):
    path = ray_config(tmp_path, router=True)
    assert "use-server SERVE_PROXY" in path.read_text()  # a rule that names the fallback server
    harden_in_place(["-f", str(path)])
    haproxy_check(path)


def test_fallback_server_kept_when_asked(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("TEXTSERVE_INGRESS_FALLBACK", "1")
    path = ray_config(tmp_path)
    harden_in_place(["-f", str(path)])
    assert "check backup\n" in path.read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("access_log, metrics", [("0", True), ("1", True), ("0", False)])
def test_access_log_datagrams_only_when_asked(tmp_path, clean_env, monkeypatch, access_log, metrics):
    """A real HAProxy on the hardened config, its log target a UDP socket of ours: a request
    through it sends a syslog line only with TEXTSERVE_INGRESS_ACCESS_LOG=1 (Ray's default sends
    one to 127.0.0.1:514 for every request, whatever the app's access-log setting), while Ray's
    per-request metrics line (the shipped default, metrics on) still reaches its own socket."""
    import socket
    import time
    import urllib.error
    import urllib.request

    from ray.serve.config import HTTPOptions

    monkeypatch.setenv("TEXTSERVE_INGRESS_ACCESS_LOG", access_log)
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    metrics_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # HAProxyManager binds it in Ray
    metrics_sock.bind(str(tmp_path / "metrics.sock"))
    metrics_sock.setblocking(False)
    port = _free_port()
    # The replica's port: one nothing listens on (30000, the default, is a live replica's while the
    # suite's Serve apps run; it would answer the request itself).
    path = ray_config(tmp_path, replica_port=_free_port(), http_options=HTTPOptions(host="127.0.0.1", port=port),
                      log_target=f"127.0.0.1:{syslog.getsockname()[1]}", stats_port=_free_port(),
                      metrics_port=_free_port(), metrics_enabled=metrics)
    harden_in_place(["-f", str(path)])
    haproxy_check(path)
    proc = subprocess.Popen([real_haproxy_binary(), "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, status = time.monotonic() + 10, None
        while status is None and time.monotonic() < deadline:
            try:  # no replica listens behind it: HAProxy answers 503 itself, and logs the request
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/predict", timeout=2)
            except urllib.error.HTTPError as err:
                status = err.code
            except OSError:
                time.sleep(0.1)
        assert status == 503
        lines, metric_lines, deadline = [], [], time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                lines.append(syslog.recv(65536))
            except socket.timeout:
                pass
            try:
                while True:
                    metric_lines.append(metrics_sock.recv(65536))
            except BlockingIOError:
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        syslog.close()
        metrics_sock.close()
    requests = [line for line in lines if b"/v1/predict" in line]
    if access_log == "1":
        assert requests, lines  # one per request (a retried first request may add one)
    else:
        assert not requests, lines
    assert bool([m for m in metric_lines if b"serve@1" in m]) == metrics, metric_lines


def test_bad_settings_fail_early(tmp_path, clean_env, monkeypatch):
    from serve.ingress import fast_ingress_env

    monkeypatch.setenv("TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S", "10s")
    with pytest.raises(ValueError, match="whole number"):
        fast_ingress_env(tmp_path / "ts")
    monkeypatch.setenv("TEXTSERVE_INGRESS_REQUEST_TIMEOUT_S", "10")
    monkeypatch.setenv("TEXTSERVE_INGRESS_ACCESS_LOG", "yes")
    with pytest.raises(ValueError, match="1 \\(on\\) or 0"):
        fast_ingress_env(tmp_path / "ts")


def test_token_buckets_bound_memory_and_keep_active_clients_limited():
    buckets = TokenBuckets(rate=1.0, burst=2, max_clients=100)
    now = 1000.0
    assert [buckets.take("hammer", now) for _ in range(3)][:2] == [0.0, 0.0]
    for i in range(10_000):  # an attacker cycling fresh keys, while the hammering client keeps going
        buckets.take(f"key-{i}", now)
        if i % 50 == 0:
            assert buckets.take("hammer", now) > 0  # still limited: recent keys are never evicted
    assert len(buckets) <= 100
    assert buckets.take("hammer", now + 5) == 0.0  # refills with time


def test_haproxy_dies_with_the_process_that_started_it(tmp_path, clean_env):
    """The wrapper Ray runs as HAProxy: when its starter (Ray's HAProxyManager) is killed, HAProxy
    goes too (a real HAProxy, started the way Ray starts it, its starter killed with SIGKILL)."""
    import os
    import signal
    import sys

    from tests._helpers import wait_until

    from ray.serve.config import HTTPOptions

    # Ports of its own: the suite's Serve, when it runs, holds the defaults (18080 aside, 8404, 9101).
    path = ray_config(tmp_path, replica_port=_free_port(), http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
                      stats_port=_free_port(), metrics_port=_free_port())
    starter = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, sys.argv[1], '-db', '-f', sys.argv[2]],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n")
    hardener = str(Path(__file__).resolve().parent.parent / "serve" / "haproxy_hardening.py")
    env = {**os.environ, "TEXTSERVE_HAPROXY_REAL_BINARY": real_haproxy_binary()}
    proc = subprocess.Popen([sys.executable, "-c", starter, hardener, str(path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    haproxy = int(proc.stdout.readline())

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False
    try:
        wait_until(lambda: running(haproxy) and os.readlink(f"/proc/{haproxy}/exe").endswith("haproxy"),
                   timeout=30, what="HAProxy running under the wrapper")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: not running(haproxy), timeout=10, what="HAProxy gone with its starter")
    finally:
        if proc.poll() is None:
            proc.kill()
        if running(haproxy) and os.readlink(f"/proc/{haproxy}/exe").endswith("haproxy"):
            os.kill(haproxy, signal.SIGKILL)  # by PID: only if the test failed and it is still ours


@pytest.mark.parametrize("exempt, rule", [
    (None, "reject if { sc0_conn_cur gt 256 } !{ src 127.0.0.1/32 ::1/128 }"),  # the default: this host
    ("", "reject if { sc0_conn_cur gt 256 }\n"),  # empty: every address capped
    ("10.0.0.0/8, 127.0.0.1", "reject if { sc0_conn_cur gt 256 } !{ src 10.0.0.0/8 127.0.0.1/32 }"),
])
def test_the_cap_exemption_renders_and_haproxy_accepts_it(tmp_path, clean_env, monkeypatch, exempt, rule):
    if exempt is not None:
        monkeypatch.setenv("TEXTSERVE_INGRESS_CAP_EXEMPT", exempt)
    path = ray_config(tmp_path)
    harden_in_place(["-f", str(path)])
    haproxy_check(path)
    assert rule in path.read_text()


def test_a_bad_exemption_is_refused_with_what_to_give(clean_env, monkeypatch):
    from serve.haproxy_hardening import setting

    monkeypatch.setenv("TEXTSERVE_INGRESS_CAP_EXEMPT", "localhost")
    with pytest.raises(ValueError, match="not an IP address or network"):
        setting("TEXTSERVE_INGRESS_CAP_EXEMPT")


def _replica_lines(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("server SERVE_REPLICA")]


def test_a_backend_rendered_empty_keeps_the_previous_replicas_while_the_app_rebuilds(tmp_path, clean_env):
    path = ray_config(tmp_path, replicas=("a", "b"))
    harden_in_place(["-db", "-f", str(path)])
    assert _replica_lines(path.read_text()) == ["SERVE_REPLICA_a", "SERVE_REPLICA_b"]
    ray_config(tmp_path, replicas=())  # what Serve renders while it rebuilds the app for a deploy
    harden_in_place(["-db", "-f", str(path)])
    assert _replica_lines(path.read_text()) == ["SERVE_REPLICA_a", "SERVE_REPLICA_b"]
    haproxy_check(path)  # still a valid config, the kept servers health-checked as before
    harden_in_place(["-db", "-f", str(path)])  # the wrapper run again on a carried config
    assert _replica_lines(path.read_text()).count("SERVE_REPLICA_a") == 1
    state = json.loads((tmp_path / CARRY_FILE).read_text())
    assert state["backend http-app"]["empty_since"] is not None  # carried lines do not renew the window
    (tmp_path / CARRY_FILE).write_text('{"backend http-app": []}')  # a damaged state file
    ray_config(tmp_path, replicas=())
    harden_in_place(["-db", "-f", str(path)])  # HAProxy still gets a config, with nothing carried
    haproxy_check(path)
    ray_config(tmp_path, replicas=("c",))  # the new replicas: only they
    harden_in_place(["-db", "-f", str(path)])
    assert _replica_lines(path.read_text()) == ["SERVE_REPLICA_c"]
    ray_config(tmp_path, replicas=())
    harden_in_place(["-c", "-f", str(path)])  # a check run carries nothing and records nothing
    assert _replica_lines(path.read_text()) == []


def test_kept_replicas_expire_and_a_removed_backend_is_forgotten(tmp_path, clean_env, monkeypatch):
    state = tmp_path / CARRY_FILE
    with_a = harden(ray_config(tmp_path, replicas=("a",)).read_text(), str(tmp_path))
    empty = harden(ray_config(tmp_path, replicas=()).read_text(), str(tmp_path))
    carry_servers(with_a, state, carry_s=30, now=1000.0)
    # The window opens at the first empty rendering, however long the servers were listed before.
    assert _replica_lines(carry_servers(empty, state, carry_s=30, now=1500.0)) == ["SERVE_REPLICA_a"]
    assert _replica_lines(carry_servers(empty, state, carry_s=30, now=1529.0)) == ["SERVE_REPLICA_a"]
    # Empty renderings do not renew it: 30 s after the first one, nothing is kept.
    assert _replica_lines(carry_servers(empty, state, carry_s=30, now=1531.0)) == []
    carry_servers(with_a, state, carry_s=30, now=2000.0)
    no_backend = "\n".join(line for line in empty.splitlines() if "http-app" not in line)
    carry_servers(no_backend, state, carry_s=30, now=2001.0)  # the app deleted: its backend gone
    assert _replica_lines(carry_servers(empty, state, carry_s=30, now=2002.0)) == []
    monkeypatch.setenv("TEXTSERVE_INGRESS_REBUILD_CARRY_S", "soon")
    with pytest.raises(ValueError, match="TEXTSERVE_INGRESS_REBUILD_CARRY_S"):
        harden_in_place(["-db", "-f", str(ray_config(tmp_path))])
