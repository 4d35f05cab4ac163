"""`ray up cluster/onprem.yaml` for real, against hosts that are network namespaces on this machine.

Not in `make test`: `make test-cluster` runs it (TEXTSERVE_CLUSTER_TEST=1). Root only (it makes
network namespaces, a bridge, mounts and one sshd per host). Anything that starts Ray here runs
under `flock /tmp/ray-tests.lock` (the Makefile target takes it).

Each host is a network namespace made by this test, with its own address on a bridge the test
made (traffic stays inside namespaces the test made: the hosts' default route points at an address
nobody holds, so nothing leaves), its own sshd, its own PID namespace, and its own mount namespace:
its own /home (root's home is /home/root there), /tmp and /mnt. What every host shares with this machine is the system
(/usr, Python under /root/.pyenv) and, as its "image", the project's venv: an overlay of
/work/main/.venv per host (writes stay on the host), seen at ~/textserve/.venv and, through a bind
of ~/textserve onto /work/main, at the path its scripts name, so a host imports the code `ray up`
copied to it, not this checkout. The venv's `.installed` stamp is fresh on each host, so the shipped
setup's `make install` finds the venv installed (the hosts reach no package registry).

The operator (this process) has a home of its own made by the test: ~/.ray/auth_token from
`ray get-auth-token --generate`, ~/.textserve/secrets.env (mode 600) and an SSH key. The cluster
file is cluster/onprem.yaml with only head_ip, worker_ips, ssh_user and ssh_private_key changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.environ.get("TEXTSERVE_CLUSTER_TEST") != "1",
                       reason="the real `ray up` test: make test-cluster (TEXTSERVE_CLUSTER_TEST=1)"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                       reason="makes network namespaces, a bridge and mounts: needs root and iproute2"),
    pytest.mark.timeout(3600),
]

SUBNET = "10.251.37"
HOSTS = {"head": f"{SUBNET}.1", "w1": f"{SUBNET}.2", "w2": f"{SUBNET}.3", "store": f"{SUBNET}.9"}
OPERATOR_ADDR = f"{SUBNET}.254"   # the bridge's address: the operator's side
NOWHERE = f"{SUBNET}.253"        # the hosts' default gateway: held by nobody, so nothing leaves
FEEDBACK_TOKEN = "feedback-" + os.urandom(8).hex()
OPERATOR_TOKEN = "operator-" + os.urandom(8).hex()
INGRESS_SECRET = os.urandom(16).hex()
BUCKET = "textserve-test"
# A host's own mount and PID namespaces: without its own PIDs, `ray stop` on one host (the setup
# runs it before every `ray start`) finds and kills every other host's Ray processes, and this
# machine's. Killing the namespace's first process ends every process of the host.
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*argv, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def poll(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except Exception as err:  # noqa: BLE001 - reported at the deadline
            last = err
        time.sleep(interval)
    raise TimeoutError(f"{what} (last error: {last!r})")


class Hosts:
    """Network namespaces with their own address, sshd, /home, /tmp and /mnt."""

    def __init__(self, base: Path):
        self.base = base
        self.tag = f"{os.getpid() % 100000}"
        self.bridge = f"tsbr{self.tag}"
        self.ns = {name: f"ts{self.tag}-{name}" for name in HOSTS}
        self.procs: dict[str, subprocess.Popen] = {}
        self.made_ns: list[str] = []
        self.made_bridge = False

    def host_dir(self, name: str) -> Path:
        return self.base / name

    def create(self, pubkey: str) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made_bridge = True
        sh("ip", "addr", "add", f"{OPERATOR_ADDR}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        passwd = re.sub(r"^root:([^:]*):0:0:([^:]*):/root:", r"root:\1:0:0:\2:/home/root:",
                        Path("/etc/passwd").read_text(), flags=re.M)
        for i, (name, addr) in enumerate(HOSTS.items()):
            ns = self.ns[name]
            sh("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            veth = f"tsv{self.tag}{i}"
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            for cmd in (["ip", "addr", "add", f"{addr}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", NOWHERE]):
                sh("ip", "netns", "exec", ns, *cmd)
            d = self.host_dir(name)
            for sub in ("home/root/.ssh", "home/root/textserve/.venv", "tmp", "mnt", "venv-up", "venv-work", "etc"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            (d / "tmp").chmod(0o1777)
            (d / "home/root/.ssh/authorized_keys").write_text(pubkey)
            (d / "etc/passwd").write_text(passwd)
            (d / "venv-up/.installed").touch()  # the host's "image": the venv installed
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "etc/ssh_host_ed25519_key")
            (d / "etc/sshd_config").write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {d}/etc/ssh_host_ed25519_key\nPidFile /tmp/sshd.pid\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPrintMotd no\nAuthorizedKeysFile /home/root/.ssh/authorized_keys\n"
                "MaxStartups 100\nMaxSessions 100\nSubsystem sftp internal-sftp\n")

    @staticmethod
    def keep_root(d: Path) -> str:
        """Shell that binds this checkout at {d}/rootsrc before a host's own /tmp and /home hide
        it (a CI clone under /tmp), so the host can bind it back at its own path."""
        (d / "rootsrc").mkdir(exist_ok=True)
        return f"mount --bind {ROOT} {d}/rootsrc; "

    def start_sshd(self, name: str) -> None:
        d = self.host_dir(name)
        script = (
            "set -e; "
            f"{self.keep_root(d)}"  # the checkout may live under /tmp, which the host replaces
            f"mount --bind {d}/home /home; mount --bind {d}/tmp /tmp; mount --bind {d}/mnt /mnt; "
            f"mount --bind {d}/etc/passwd /etc/passwd; "
            f"mount -t overlay overlay -o lowerdir={d}/rootsrc/.venv,upperdir={d}/venv-up,workdir={d}/venv-work "
            "/home/root/textserve/.venv; "
            f"mkdir -p {ROOT}; mount --rbind /home/root/textserve {ROOT}; "
            "mkdir -p /run/sshd; "
            f"exec /usr/sbin/sshd -D -e -f {d}/etc/sshd_config"
        )
        out = open(d / "sshd.log", "w")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], *UNSHARE, "sh", "-c", script],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def run_in(self, name: str, script: str, log_name: str) -> subprocess.Popen:
        """A long-lived process on a host (its own mounts), e.g. the S3 server."""
        d = self.host_dir(name)
        full = (f"set -e; {self.keep_root(d)}mount --bind {d}/tmp /tmp; mount --bind {d}/home /home; "
                f"mkdir -p {ROOT}; mount --bind {d}/rootsrc {ROOT}; exec {script}")
        out = open(d / log_name, "w")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[name], *UNSHARE, "sh", "-c", full],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[f"{name}:{log_name}"] = proc
        return proc

    def pids(self, name: str) -> list[int]:
        out = sh("ip", "netns", "pids", self.ns[name], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, name: str) -> list[int]:
        """Every process in the host's network namespace, SIGKILL, by PID (a power cut)."""
        killed = []
        for _ in range(20):
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return killed

    def cleanup(self) -> list[str]:
        """Every process of the hosts (by PID), the namespaces, the bridge; each step runs even if
        one before it failed. Returns what is still there afterwards (nothing, normally)."""
        problems = []
        for name in HOSTS:
            if self.ns[name] in self.made_ns:
                try:
                    self.kill_host(name)
                except Exception as err:  # noqa: BLE001 - reported below
                    problems.append(f"killing {name}: {err!r}")
        for proc in self.procs.values():
            try:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=30)
            except Exception as err:  # noqa: BLE001
                problems.append(f"process {proc.pid}: {err!r}")
        for ns in self.made_ns:
            if left := self.pids_of_ns(ns):
                problems.append(f"{ns}: processes {left} still running")
            sh("ip", "netns", "del", ns, check=False)
        if self.made_bridge:
            sh("ip", "link", "del", self.bridge, check=False)
        names = sh("ip", "netns", "list", check=False).stdout
        problems += [f"namespace {ns} still there" for ns in self.made_ns if re.search(rf"^{ns}\b", names, re.M)]

        def links() -> list[str]:
            shown = sh("ip", "-o", "link", "show", check=False).stdout
            return re.findall(rf"^\d+: (tsbr{self.tag}|tsv{self.tag}\d)[@:]", shown, re.M)

        # the kernel frees a deleted namespace, and with it the veths' peers, a moment later
        deadline = time.monotonic() + 15
        while links() and time.monotonic() < deadline:
            time.sleep(0.5)
        for link in links():
            sh("ip", "link", "del", link, check=False)
        problems += [f"link {link} still there" for link in links()]
        return problems

    @staticmethod
    def pids_of_ns(ns: str) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]


def sweep_dead_runs() -> list[str]:
    """What a run of this test that died before its cleanup (SIGKILL, a power cut) left: the
    processes in its namespaces (by PID), the namespaces, its bridge and veths. A run is dead when
    no pytest process has the PID its names carry (PID % 100000); this run has made nothing yet."""
    alive = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if b"pytest" in (entry / "cmdline").read_bytes():
                    alive.add(str(int(entry.name) % 100000))
            except OSError:
                continue
    swept = []
    names = sh("ip", "netns", "list", check=False).stdout
    for ns, tag in re.findall(rf"^(ts(\d+)-(?:{'|'.join(HOSTS)}))\b", names, re.M):
        if tag in alive:
            continue
        for _ in range(20):
            if not (pids := Hosts.pids_of_ns(ns)):
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        sh("ip", "netns", "del", ns, check=False)
        swept.append(ns)
    links = sh("ip", "-o", "link", "show", check=False).stdout
    for link, kind, digits in re.findall(r"^\d+: ((tsbr|tsv)(\d+))[@:]", links, re.M):
        tag = digits if kind == "tsbr" else digits[:-1]  # a veth's name ends in the host's index
        if tag not in alive:
            sh("ip", "link", "del", link, check=False)
            swept.append(link)
    return swept


def cluster_processes(hosts: Hosts, name: str) -> list[str]:
    """Ray's processes left on a host (sshd and the test's own helpers are not Ray's)."""
    found = []
    for pid in hosts.pids(name):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(r"raylet|gcs_server|ray::|dashboard|ray/_private|ray/autoscaler|default_worker|haproxy|log_monitor|node_watch",
                     cmd):
            found.append(f"{pid} {cmd[:160]}")
    return found


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 30.0):
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    def parse(raw: bytes):
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return raw.decode(errors="replace")

    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, parse(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, parse(err.read())


def test_ray_up_onprem_on_namespace_hosts(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, a bridge, mounts, sshd")
    for tool in ("ip", "unshare", "rsync", "ssh", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} is not installed"
    assert Path("/usr/sbin/sshd").exists(), "openssh-server is not installed (apt-get install -y openssh-server)"

    if swept := sweep_dead_runs():
        log(f"removed what a dead run of this test left: {swept}")
    base = Path("/var/tmp") / f"tsrayup-{os.getpid()}"  # not /tmp: each host gets its own /tmp
    base.mkdir(parents=True)
    op_home = base / "operator"
    (op_home / ".ssh").mkdir(parents=True)
    report: dict = {"steps": []}
    t0 = time.monotonic()

    def step(what: str, **facts):
        entry = {"at_s": round(time.monotonic() - t0, 1), "what": what, **facts}
        report["steps"].append(entry)
        log(f"{what} {facts if facts else ''}")

    op_env = {**os.environ, "HOME": str(op_home), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    op_env.pop("RAY_ADDRESS", None)
    # Ray 2.60's `ray up` starts the head with autoscaler v2 unless told otherwise; with the `local`
    # provider v2 takes the head's address for a worker instance, marks it terminated and never
    # launches the second worker (seen here: "Adding 1 nodes to satisfy min count" every 5 s, no
    # launch). v1, which the on-prem docs ask for, brings up every worker_ips host.
    op_env["RAY_UP_enable_autoscaler_v2"] = "0"
    # The operator's temp folder is the test's too: the local provider's cluster state and lock
    # files go there (Ray puts them in $TMPDIR/ray), not in this machine's /tmp.
    op_tmp = op_home / "tmp"
    op_tmp.mkdir()
    op_env["TMPDIR"] = str(op_tmp)
    # Ray's SSH control sockets: always under /tmp (ray_ssh_<user hash>/<cluster hash>)
    import getpass
    import hashlib
    ssh_control = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}" / \
        hashlib.sha256(b"textserve-onprem").hexdigest()[:10]
    hosts = Hosts(base / "hosts")
    config_path = base / "onprem.yaml"
    leftovers: list[str] = []

    def terminated(signum, frame):  # a killed run still cleans up (finally below)
        raise SystemExit(f"signal {signum}")

    previous_handlers = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        # --- the operator's machine: SSH key, Ray token, secrets ---
        key = op_home / ".ssh" / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        sh(VENV_BIN / "ray", "get-auth-token", "--generate", env=op_env)
        token = (op_home / ".ray" / "auth_token").read_text().strip()
        assert token
        (op_home / ".textserve").mkdir()
        secrets = op_home / ".textserve" / "secrets.env"
        secrets.write_text(
            f"TEXTSERVE_FEEDBACK_TOKEN={FEEDBACK_TOKEN}\nTEXTSERVE_OPERATOR_TOKEN={OPERATOR_TOKEN}\n"
            f"TEXTSERVE_INGRESS_SECRET={INGRESS_SECRET}\n"
            "AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\nAWS_DEFAULT_REGION=us-east-1\n"
            f"AWS_ENDPOINT_URL=http://{HOSTS['store']}:5000\n")
        secrets.chmod(0o600)

        # --- the hosts ---
        hosts.create((key.with_suffix(".pub")).read_text())
        for name in ("head", "w1", "w2"):
            hosts.start_sshd(name)
        for name in ("head", "w1", "w2"):
            poll(lambda n=name: sh("ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                   "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", f"root@{HOSTS[n]}", "echo $HOME",
                                   check=False).stdout.strip() == "/home/root", 60, f"sshd on {name}")
        step("hosts up", hosts=HOSTS)

        # --- the cluster file: the shipped one, addresses, user and key changed ---
        shipped = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
        config = json.loads(json.dumps(shipped))
        config["provider"]["head_ip"] = HOSTS["head"]
        config["provider"]["worker_ips"] = [HOSTS["w1"], HOSTS["w2"]]
        config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
        changed = {k for k in shipped if shipped[k] != config[k]}
        assert changed == {"provider", "auth"}
        assert {k for k in shipped["provider"] if shipped["provider"][k] != config["provider"][k]} == {"head_ip", "worker_ips"}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        # --- ray up ---
        started = time.monotonic()
        up = sh(VENV_BIN / "ray", "up", "-y", "--no-config-cache", config_path, env=op_env, cwd=ROOT, timeout=1500,
                check=False)
        (base / "ray_up.log").write_text(up.stdout + up.stderr)
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        step("ray up", seconds=round(time.monotonic() - started, 1))

        def ray_exec(command: str, timeout: float = 600, check: bool = True) -> str:
            proc = sh(VENV_BIN / "ray", "exec", config_path, command, env=op_env, cwd=ROOT, timeout=timeout, check=False)
            if check and proc.returncode != 0:
                raise RuntimeError(f"ray exec {command!r}: rc {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}")
            return proc.stdout + proc.stderr

        # --- every node joined, with token authentication ---
        alive_script = ("python -c \"import ray, json; ray.init(address='auto', logging_level='ERROR'); "
                        "print('NODES', json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))\"")

        def joined():
            out = ray_exec(alive_script, timeout=180, check=False)
            match = re.search(r"NODES (\[.*\])", out)
            nodes = json.loads(match.group(1)) if match else []
            return nodes if set(nodes) == {HOSTS["head"], HOSTS["w1"], HOSTS["w2"]} else None

        nodes = poll(joined, 900, "the head and both workers alive in the cluster", interval=10)
        step("nodes joined", nodes=nodes)

        status_env = {k: v for k, v in op_env.items() if not k.startswith("RAY_AUTH")}
        wrong = sh(VENV_BIN / "ray", "status", "--address", f"{HOSTS['head']}:6379", check=False, timeout=120,
                   env={**status_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
        right = sh(VENV_BIN / "ray", "status", "--address", f"{HOSTS['head']}:6379", check=False, timeout=120,
                   env={**status_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        empty_home = base / "no-token-home"
        empty_home.mkdir()
        try:  # no token, no token mode
            none = sh(VENV_BIN / "ray", "status", "--address", f"{HOSTS['head']}:6379", check=False, timeout=120,
                      env={**status_env, "HOME": str(empty_home)})
        except subprocess.TimeoutExpired as err:  # never answered: refused as well
            none = subprocess.CompletedProcess(err.cmd, "timeout", str(err.stdout or ""), str(err.stderr or ""))
        step("token check", wrong_rc=wrong.returncode, right_rc=right.returncode, no_token_rc=none.returncode,
             wrong_tail=(wrong.stdout + wrong.stderr)[-300:], no_token_tail=(none.stdout + none.stderr)[-300:])
        assert right.returncode == 0, (right.stdout + right.stderr)[-2000:]
        assert wrong.returncode != 0, "a client with a wrong token was answered"
        assert none.returncode != 0, "a client without a token was answered"
        # the dashboard (Jobs API) listens on the head's loopback only, and answers only with the token
        try:
            outside = http("GET", f"http://{HOSTS['head']}:8265/api/jobs/", timeout=10)[0]
        except OSError as err:
            outside = repr(err)
        jobs = ("import sys, urllib.request, urllib.error\n"
                "req = urllib.request.Request('http://127.0.0.1:8265/api/jobs/', headers=dict(a.split(': ', 1) for a in sys.argv[1:]))\n"
                "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
                "except urllib.error.HTTPError as err:\n    print(err.code)\n")
        inside = {label: sh("ip", "netns", "exec", hosts.ns["head"], VENV_BIN / "python", "-c", jobs, *headers,
                            check=False).stdout.strip()
                  for label, headers in (("no_token", []), ("wrong_token", ["Authorization: Bearer not-the-token"]),
                                         ("token", [f"Authorization: Bearer {token}"]))}
        step("dashboard check", from_outside=outside, on_the_head=inside)
        assert not isinstance(outside, int), f"the dashboard answered on the head's address: {outside}"
        assert inside == {"no_token": "401", "wrong_token": "403", "token": "200"}, inside

        # the secrets reached every node's raylet environment (and so every worker it starts)
        for name in ("head", "w1", "w2"):
            env_seen = []
            for pid in hosts.pids(name):
                try:
                    if b"raylet" in Path(f"/proc/{pid}/comm").read_bytes():
                        env_seen.append(Path(f"/proc/{pid}/environ").read_bytes())
                except OSError:
                    pass
            assert env_seen, f"no raylet on {name}"
            assert all(f"TEXTSERVE_INGRESS_SECRET={INGRESS_SECRET}".encode() in e
                       and f"TEXTSERVE_FEEDBACK_TOKEN={FEEDBACK_TOKEN}".encode() in e
                       and f"TEXTSERVE_OPERATOR_TOKEN={OPERATOR_TOKEN}".encode() in e for e in env_seen), name
            # only the source travelled: no artifacts or caches from this checkout on the host
            copied = hosts.host_dir(name) / "home/root/textserve"
            assert (copied / "serve" / "app.py").exists(), name
            assert not (copied / "textserve.egg-info").exists() and not (copied / ".git").exists(), name
        step("secrets in every raylet's environment; only the source copied")

        report["ok_through"] = "join"
        serve_failure = None
        try:  # whatever happens to the app, `ray down` below still runs and is checked
            _serve_part(hosts, ray_exec, config_path, op_env, base, step, report)
        except Exception as err:  # noqa: BLE001 - raised again after ray down
            serve_failure = err
            step("serve part failed", error=repr(err)[:2000])

        # --- ray down ---
        started = time.monotonic()
        down = sh(VENV_BIN / "ray", "down", "-y", config_path, env=op_env, cwd=ROOT, timeout=900, check=False)
        (base / "ray_down.log").write_text(down.stdout + down.stderr)
        step("ray down", rc=down.returncode, seconds=round(time.monotonic() - started, 1))
        assert down.returncode == 0, (down.stdout + down.stderr)[-4000:]
        # `ray down` of the local provider runs `ray stop` on the head only and marks the workers
        # terminated; a worker's raylet (and its workers) exit once the GCS has been unreachable
        # for 60 s, and the shipped file's cluster/node_watch.py then ends what the raylet leaves
        # (Ray's log monitor, its agents). Nothing else is run on the workers.
        report["left_right_after_down"] = {n: cluster_processes(hosts, n) for n in ("head", "w1", "w2")}
        started = time.monotonic()
        try:
            poll(lambda: all(not cluster_processes(hosts, n) for n in ("head", "w1", "w2")) or None, 300,
                 "no process of the cluster left after ray down", interval=2)
        finally:
            report["left_after_down"] = {n: cluster_processes(hosts, n) for n in ("head", "w1", "w2")}
        step("no cluster process left on any host after ray down", seconds=round(time.monotonic() - started, 1))
        # nor any other process but the hosts' own sshd (and the namespace's first process)
        others = {}
        for name in ("head", "w1", "w2"):
            for pid in hosts.pids(name):
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if comm not in {"sshd", "sshd-session", "unshare"}:
                    others.setdefault(name, []).append(f"{pid} {cmd[:160]}")
        report["other_processes_after_down"] = others
        assert not others, others
        watch_log = list((hosts.host_dir("w1") / "tmp" / "ray").glob("session_2*/logs/textserve_node_watch.log"))
        report["node_watch_log_w1"] = [p.read_text()[-1000:] for p in watch_log]
        if serve_failure is not None:
            raise serve_failure
    finally:
        report["seconds"] = round(time.monotonic() - t0, 1)
        out = Path(os.environ.get("TEXTSERVE_CLUSTER_REPORT", base / "report.json"))
        try:
            out.write_text(json.dumps(report, indent=2))
        except OSError:
            pass
        log(f"report: {json.dumps(report)[:4000]}")
        leftovers = hosts.cleanup()
        for folder in (ssh_control, ssh_control.parent):  # empty once the SSH masters are gone
            try:
                folder.rmdir()
            except OSError:
                pass
        if os.environ.get("TEXTSERVE_CLUSTER_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"kept {base}")
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if leftovers:
            log(f"LEFT AFTER CLEANUP: {leftovers}")
    assert not leftovers, leftovers


def _serve_part(hosts, ray_exec, config_path, op_env, base, step, report):
    """The app on the cluster, driven by the operator's commands; filled in below."""
    if os.environ.get("TEXTSERVE_CLUSTER_SERVE", "1") != "1":
        return
    _serve_steps(hosts, ray_exec, config_path, op_env, base, step, report)


def _serve_steps(hosts, ray_exec, config_path, op_env, base, step, report):
    # the model store: an S3 API server (moto) on a host of its own
    hosts.run_in("store", f"{VENV_BIN}/moto_server -H {HOSTS['store']} -p 5000", "moto.log")
    poll(lambda: http("GET", f"http://{HOSTS['store']}:5000/")[0] == 200, 120, "the S3 server")
    import urllib.request
    urllib.request.urlopen(urllib.request.Request(f"http://{HOSTS['store']}:5000/{BUCKET}", method="PUT"), timeout=30)
    store = f"s3://{BUCKET}/textserve/models"
    step("store up", store=store)

    # train on the node with `trainer` (the head on-prem), through the Jobs API
    started = time.monotonic()
    out = ray_exec("cd ~/textserve && ray job submit --working-dir . -- python -m train --size small --epochs 1 "
                   f"--steps-per-epoch 20 --worker-resources '{{\"trainer\": 1}}' --store {store} "
                   f"--storage-path s3://{BUCKET}/textserve/ray_results", timeout=1500)
    (base / "train_job.log").write_text(out)
    assert "succeeded" in out.lower(), out[-4000:]
    # its one Ray Train worker ran on the node with `trainer` (the head) and published to the store
    assert re.search(rf"ip={re.escape(HOSTS['head'])}, pid=\d+\) world_rank=0", out), out[-4000:]
    trained = int(re.search(r"published model version (\d+) -> " + re.escape(store), out).group(1))
    listing = http("GET", f"http://{HOSTS['store']}:5000/{BUCKET}?list-type=2&prefix=textserve/models/")[1]
    assert f"textserve/models/v{trained:06d}/_COMMITTED" in str(listing), str(listing)[:2000]
    step("training job", seconds=round(time.monotonic() - started, 1), version=trained)

    # serve deploy: serve_cluster.yaml with its store URI adapted, copied to the head
    serve_config = (ROOT / "cluster" / "serve_cluster.yaml").read_text().replace("s3://your-bucket/textserve/models", store)
    assert serve_config != (ROOT / "cluster" / "serve_cluster.yaml").read_text()
    local = base / "serve_cluster.yaml"
    local.write_text(serve_config)
    sh(VENV_BIN / "ray", "rsync-up", config_path, local, "~/serve_cluster.yaml", env=op_env, cwd=ROOT, timeout=300)
    started = time.monotonic()
    ray_exec("serve deploy ~/serve_cluster.yaml", timeout=600)

    def answered_everywhere():
        for name in ("head", "w1", "w2"):
            code, body = http("POST", f"http://{HOSTS[name]}:8000/v1/predict", {"text": "turn on the kitchen light"})
            if code != 200:
                return None
        return True

    poll(answered_everywhere, 1200, "predictions through every node's ingress", interval=5)
    step("predictions through each node's ingress", seconds=round(time.monotonic() - started, 1))
    report["ok_through"] = "predict"

    # feedback with the token is accepted; without it, refused
    code, _ = http("POST", f"http://{HOSTS['w1']}:8000/v1/feedback",
                   {"event_id": "no-token", "text": "turn on the lights", "label": "HassTurnOn"})
    assert code == 401, code  # no bearer token
    for name in ("head", "w1", "w2"):  # operator details only with the operator token, on every ingress
        for token in (None, FEEDBACK_TOKEN):
            code, model = http("GET", f"http://{HOSTS[name]}:8000/v1/model", token=token)
            assert code == 200 and "learner" not in model, (name, code, model)
        code, model = http("GET", f"http://{HOSTS[name]}:8000/v1/model", token=OPERATOR_TOKEN)
        assert code == 200 and "learner" in model, (name, code, model)
    acked = []
    for i in range(20):
        code, body = http("POST", f"http://{HOSTS['w1' if i % 2 else 'w2']}:8000/v1/feedback",
                          {"event_id": f"e{i}", "text": f"switch on the porch lamp {i}", "label": "HassTurnOn"},
                          token=FEEDBACK_TOKEN)
        assert code == 202, (code, body)
        acked.append(f"e{i}")
    step("feedback accepted with the token", events=len(acked))
    report["ok_through"] = "feedback"

    def learner_status():
        code, model = http("GET", f"http://{HOSTS['head']}:8000/v1/model", token=OPERATOR_TOKEN)
        return model.get("learner") if code == 200 and isinstance(model, dict) else None

    # learned, published, and loaded by both Classifier replicas (one per worker, checked below);
    # the learner's base is the version the training job published
    def learned_everywhere():
        status = learner_status()
        if not status or (status.get("served_offset") or -1) < len(acked) - 1:
            return None
        caught_up = [r for r in (status.get("replicas") or {}).values() if (r.get("log_offset") or -1) >= len(acked) - 1]
        return status if len(caught_up) >= 2 else None

    try:
        learned = poll(learned_everywhere, 300, "every event learned and served by both replicas", interval=3)
    finally:
        report["learned"] = learner_status()
    step("feedback learned and served by both replicas", served_offset=learned.get("served_offset"),
         base_version=learned.get("base_version"))
    assert learned.get("base_version") == trained, (learned.get("base_version"), trained)

    # where the replicas run: one Classifier on each worker (Serve spreads them; `serving` nodes only)
    where = ray_exec("python -c \"import ray, json, collections; ray.init(address='auto', logging_level='ERROR'); "
                     "from ray.util.state import list_actors; ip = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}; "
                     "print('WHERE', json.dumps(collections.Counter(ip[a.node_id] + ' ' + a.class_name.split(':')[-1] "
                     "for a in list_actors(filters=[('state', '=', 'ALIVE')], limit=1000) if 'ServeReplica' in a.class_name)))\"",
                     timeout=300)
    placement = json.loads(re.search(r"WHERE (\{.*\})", where).group(1))
    report["replicas"] = placement
    step("replicas placed", replicas=placement)
    assert placement.get(f"{HOSTS['w1']} Classifier") and placement.get(f"{HOSTS['w2']} Classifier"), placement
    assert placement.get(f"{HOSTS['head']} OnlineLearner") == 1, placement

    # traffic stays among the test's hosts: the only connections with the operator's side (the
    # bridge's address, in this machine's namespace) are the ones it opened (SSH, HTTP), and none
    # is established anywhere else (nothing else is routed: the default gateway is nobody)
    def address(endpoint: str) -> tuple[str, str]:
        host, port = endpoint.rsplit(":", 1)
        host = host.strip("[]")
        return (host[7:] if host.startswith("::ffff:") else host), port

    own = set(HOSTS.values())
    outside = []
    for name in HOSTS:
        for line in sh("ip", "netns", "exec", hosts.ns[name], "ss", "-Htn", check=False).stdout.splitlines():
            fields = line.split()
            (_, local_port), (peer, _) = address(fields[-2]), address(fields[-1])
            if peer.startswith("127.") or peer == "::1" or peer in own:
                continue
            if peer == OPERATOR_ADDR and local_port in {"22", "8000", "5000"}:
                continue
            if peer != OPERATOR_ADDR and fields[0] != "ESTAB":
                continue  # an attempt to reach the outside that goes nowhere
            outside.append(f"{name}: {line}")
    report["connections_out"] = outside
    assert not outside, outside

    # one worker host killed: serving continues on the others
    killed = hosts.kill_host("w2")
    step("w2 killed", pids=len(killed))

    def serving_on_rest():
        ok = 0
        for _ in range(10):
            for name in ("head", "w1"):
                code, _ = http("POST", f"http://{HOSTS[name]}:8000/v1/predict", {"text": "lock the front door"}, timeout=10)
                ok += code == 200
        return ok == 20

    poll(serving_on_rest, 600, "serving on head and w1 after w2 died", interval=2)
    step("serving continues after a worker host died")
    # no acknowledged event lost: the learner (on the head) holds every one
    code, model = http("GET", f"http://{HOSTS['head']}:8000/v1/model", token=OPERATOR_TOKEN)
    report["model_after_kill"] = model
    assert code == 200, (code, model)
    assert model["learner"]["log_length"] >= len(acked), model["learner"]
    report["ok_through"] = "kill"
