"""Every cluster file is authenticated and complete: token auth on every `ray start`, no
dashboard on all addresses without it, the KubeRay manifest valid against KubeRay's RayService
schema, self-contained, and serving exactly cluster/serve_cluster.yaml. Offline, no cluster."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.check import check_file, manifest_reference_problems, ray_up_auth_problems, rayservice_auth_problems
from cluster.kuberay import drift, render, rayservice

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SCHEMA = Path(__file__).with_name("data") / "kuberay_rayservice_v1.schema.yaml"
RAY_UP_FILES = ["aws.yaml", "onprem.yaml"]


def _ray_starts(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in config.get(key) or [] if "ray start" in c]


def test_every_cluster_file_is_checked_and_passes():
    files = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert {"aws.yaml", "onprem.yaml", "kuberay.yaml"} <= set(files)
    for name in files:
        assert check_file(CLUSTER / name) == [], name


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_files_start_every_node_with_token_auth_and_a_private_dashboard(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    starts = _ray_starts(config)
    assert len(starts) == 2  # the head's and the workers'
    assert all("RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # the token comes from the operator's machine, never from this repository
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not (CLUSTER.parent / ".ray").exists()


@pytest.mark.parametrize("name", RAY_UP_FILES)
@pytest.mark.parametrize("breakage, message", [
    (lambda c: c.replace("export RAY_AUTH_MODE=token && ", ""), "without RAY_AUTH_MODE=token"),
    (lambda c: c.replace("export RAY_AUTH_MODE=token", "export RAY_AUTH_MODE=disabled"), "without RAY_AUTH_MODE=token"),
    (lambda c: c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "dashboard listens on all addresses"),
    (lambda c: c.replace("--dashboard-host=127.0.0.1", "--dashboard-host '::'"), "dashboard listens on all addresses"),
])
def test_the_check_catches_an_unauthenticated_start(name, breakage, message):
    config = yaml.safe_load((CLUSTER / name).read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [breakage(c) for c in config[key]]
    problems = ray_up_auth_problems(config, name)
    assert any(message in p for p in problems), problems


def test_a_token_set_after_ray_start_does_not_count():
    config = {"head_start_ray_commands": ["ray start --head && export RAY_AUTH_MODE=token"]}
    assert ray_up_auth_problems(config, "x")


def test_aws_gpu_setup_fails_loudly_without_the_gpu_build_of_tensorflow():
    text = (CLUSTER / "aws.yaml").read_text()
    assert "|| true" not in text
    config = yaml.safe_load(text)
    gpu_setup = config["available_node_types"]["gpu_trainer"]["worker_setup_commands"]
    # each command's failure stops the setup: no GPU, no GPU build of TensorFlow, or it sees no GPU
    assert "nvidia-smi" in gpu_setup
    assert "cd ~/textserve && .venv/bin/pip install -q -e '.[gpu]'" in gpu_setup
    assert "list_physical_devices('GPU')" in gpu_setup[-1] and "sys.exit(0 if gpus else" in gpu_setup[-1]
    # it replaces the global setup on that node type, so it repeats it (the token included)
    assert set(config["setup_commands"]) <= set(gpu_setup)
    assert "[gpu]" not in " ".join(config["setup_commands"] + config.get("worker_setup_commands", []))


def _manifest() -> str:
    return (CLUSTER / "kuberay.yaml").read_text()


def test_kuberay_turns_token_auth_on_with_a_documented_secret():
    text = _manifest()
    service = rayservice(text)
    auth = service["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "textserve-ray-auth"}
    assert "kubectl create secret generic textserve-ray-auth --from-literal=auth_token=" in text
    assert rayservice_auth_problems(service, "kuberay.yaml") == []
    no_auth = copy.deepcopy(service)
    del no_auth["spec"]["rayClusterConfig"]["authOptions"]
    problems = rayservice_auth_problems(no_auth, "kuberay.yaml")
    assert any("no token authentication" in p for p in problems)
    assert any("dashboard listens on all pod addresses" in p for p in problems)


def test_kuberay_manifest_is_self_contained():
    text = _manifest()
    assert manifest_reference_problems(text, "kuberay.yaml") == []
    kinds = {d["kind"]: d for d in yaml.safe_load_all(text) if d}
    assert kinds["PersistentVolumeClaim"]["metadata"]["name"] == "textserve-shared"
    # only the head pod mounts it, one at a time (upgradeStrategy None): ReadWriteOnce is enough
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # a reference to an object nobody defines is caught
    broken = text.replace("claimName: textserve-shared", "claimName: textserve-other", 1)
    assert any("PersistentVolumeClaim textserve-other" in p for p in manifest_reference_problems(broken, "k"))
    undocumented = text.replace("kubectl create secret generic textserve-secrets", "kubectl create secret x")
    assert any("Secret textserve-secrets" in p for p in manifest_reference_problems(undocumented, "k"))


def test_kuberay_serves_exactly_serve_cluster_yaml(tmp_path):
    assert drift() is None
    # the check notices a drift, and the generator repairs it
    drifted = tmp_path / "kuberay.yaml"
    drifted.write_text(_manifest().replace("max_replicas: 32", "max_replicas: 31"))
    assert "python -m cluster kuberay" in drift(drifted)
    drifted.write_text(render(drifted.read_text(), (CLUSTER / "serve_cluster.yaml").read_text()))
    assert drift(drifted) is None
    assert render(_manifest(), (CLUSTER / "serve_cluster.yaml").read_text()) == _manifest()


def _validator():
    schema = yaml.safe_load(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_kuberay_rayservice_is_valid_against_kuberays_schema():
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(rayservice(_manifest()))]
    assert errors == []


@pytest.mark.parametrize("path, value, where", [
    (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParam"), {}, "rayStartParam"),  # typo
    (("spec", "rayClusterConfig", "authOptions", "mode"), "tokens", "mode"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "1", "minReplicas"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "envFrom", 0, "secretRef", "nam"), "x", "nam"),
    (("spec", "serveConfigV2"), {"applications": []}, "serveConfigV2"),
])
def test_the_schema_rejects_what_kubernetes_would(path, value, where):
    doc = rayservice(_manifest())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = list(_validator().iter_errors(doc))
    assert errors and any(where in (e.message + "/".join(map(str, e.absolute_path))) for e in errors), errors


# --- every command in docs/SCALING.md runs as written, as far as this machine can tell ---

def _doc_commands(path: Path) -> list[list[str]]:
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if argv := shlex.split(line, comments=True):
                commands.append(argv)
    return commands


@functools.cache
def _cli_help(cli: str, sub: tuple[str, ...]) -> str:
    """`ray SUB --help` / `serve SUB --help`: the installed CLIs' own click commands (what the
    `ray` and `serve` executables run), invoked in this process."""
    from click.testing import CliRunner

    if cli == "ray":
        from ray.scripts.scripts import cli as command
    else:
        from ray.serve.scripts import cli as command
    for name in sub:  # the subcommand itself: the group's callback would reconfigure Ray's loggers
        command = command.commands[name]
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0, (cli, sub, result.output[-2000:])
    return result.output


def _check_flags(cli: str, argv: list[str]) -> None:
    sub = argv[:2] if argv[0] == "job" else argv[:1]
    help_text = _cli_help(cli, tuple(sub))
    for arg in argv[len(sub):]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in help_text, f"{cli} {' '.join(sub)} has no {arg.split('=')[0]}"
        elif arg.endswith(".yaml") and not arg.startswith("~") and " " not in arg:  # not a node's path or command
            assert (CLUSTER.parent / arg).exists(), arg


def _check_python_m_train(argv: list[str]) -> None:
    from train.cli import parse_args

    try:
        parse_args(argv)
    except SystemExit as err:  # argparse's error
        raise AssertionError(f"python -m train {' '.join(argv)}: rejected ({err})") from err


def test_every_command_in_scaling_md_parses():
    checked, not_here = [], []
    for argv in _doc_commands(CLUSTER.parent / "docs" / "SCALING.md"):
        if argv[:3] == ["python", "-m", "train"]:
            _check_python_m_train(argv[3:])
        elif argv[:3] == ["python", "-m", "cluster"]:
            if argv[3] == "kuberay":
                assert drift() is None
            else:
                assert all(check_file(CLUSTER.parent / f) == [] for f in argv[4:])
        elif argv[:3] == ["ray", "job", "submit"]:
            split = argv.index("--")
            _check_flags("ray", argv[1:split])
            assert argv[split + 1:split + 4] == ["python", "-m", "train"]
            _check_python_m_train(argv[split + 4:])
        elif argv[0] in ("ray", "serve"):
            _check_flags(argv[0], argv[1:])
        else:  # pip, export, cd, kubectl, aws, docker, shell built-ins: nothing to run them against here
            not_here.append(argv[0])
            continue
        checked.append(" ".join(argv))
    fine_tune = [c for c in checked if "--fine-tune" in c]
    assert fine_tune and all("--storage-path" in c for c in fine_tune)  # multi-node runs need it
    assert any(c.startswith("ray get-auth-token --generate") for c in checked)
    assert set(not_here) <= {"pip", "export", "cd", "kubectl", "aws", "docker", "mkdir", "printf", "chmod",
                             "echo", "umask", "ssh-keygen", "cat", "sudo", "ip", "curl", "ssh"}, not_here


# --- cluster/aws.yaml would work: images, Python, profiles, the log's volume, rsync filters ---

CPU_IMAGE = "resolve:ssm:/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id"
GPU_IMAGE = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _setup_of(config: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node type (its own worker_setup_commands replace the global)."""
    spec = config["available_node_types"][node_type]
    if node_type == config["head_node_type"]:
        return config["setup_commands"] + config.get("head_setup_commands", [])
    return spec.get("worker_setup_commands", config["setup_commands"] + config.get("worker_setup_commands", []))


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_files_pass_rays_own_offline_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / name).read_text()))
    validate_config(config)  # raises on a schema error
    broken = copy.deepcopy(config)
    broken["rsync_exclude"] = ".venv"  # a string where Ray's schema wants a list
    with pytest.raises(Exception):
        validate_config(broken)


def test_aws_chooses_an_image_on_purpose_for_every_node_type():
    config = _aws()
    images = {name: spec["node_config"].get("ImageId") for name, spec in config["available_node_types"].items()}
    # Ray's fallback (an Ubuntu 18.04 DLAMI with no python3.11) is never used: every type names one
    assert all(images.values()), images
    assert images["head"] == images["cpu_serving"] == CPU_IMAGE          # plain Ubuntu 22.04, no CUDA
    assert images["gpu_trainer"] == GPU_IMAGE                             # Ubuntu 22.04 + NVIDIA driver
    # both are Ubuntu 22.04, whose universe archive has python3.11 and python3.11-venv
    for node_type in images:
        setup = _setup_of(config, node_type)
        assert "22.04" in images[node_type]
        assert any("apt-get install -y python3.11 python3.11-venv" in c for c in setup), node_type
        assert any("make install PYTHON=python3.11" in c for c in setup), node_type


def test_aws_gives_every_node_type_a_profile_with_store_access():
    config = _aws()
    profiles = {n: s["node_config"].get("IamInstanceProfile") for n, s in config["available_node_types"].items()}
    assert profiles == {"head": {"Name": "textserve-head"}, "gpu_trainer": {"Name": "textserve-node"},
                        "cpu_serving": {"Name": "textserve-node"}}
    doc = (CLUSTER.parent / "docs" / "SCALING.md").read_text()
    for name in ("textserve-head", "textserve-node"):  # the docs say how to make them
        assert f"--instance-profile-name {name}" in doc
    assert "iam:PassRole" in doc  # the head launches workers with textserve-node's role


def test_aws_mounts_the_learners_volume_where_the_log_is_read_and_nowhere_else():
    config = _aws()
    serve = yaml.safe_load((CLUSTER / "serve_cluster.yaml").read_text())
    state_dir = serve["applications"][0]["args"]["learner"]["state_dir"]
    assert state_dir.startswith("/mnt/shared/")
    mounts = {n: [c for c in _setup_of(config, n) if "mount -t nfs4" in c] for n in config["available_node_types"]}
    assert len(mounts["head"]) == 1 and len(mounts["gpu_trainer"]) == 1  # the learner; a fine-tune
    assert mounts["cpu_serving"] == []
    mount = mounts["head"][0]
    assert '"$TEXTSERVE_EFS:/" /mnt/shared' in mount and "nfsvers=4.1" in mount
    assert "lookupcache=none" in mount  # the ownership fence sees a new epoch at once (ONLINE_LEARNING.md)
    # the learner is pinned to the head, which mounts the volume
    learner = next(d for d in serve["applications"][0]["deployments"] if d["name"] == "OnlineLearner")
    # half the head's `learner`: a deploy's replacement learner fits beside the serving one
    assert learner["ray_actor_options"]["resources"] == {"learner": 0.5}
    assert config["available_node_types"]["head"]["resources"] == {"learner": 1}


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_rsync_filters_keep_the_venv_artifacts_and_caches_off_the_nodes(name, tmp_path):
    """Ray's own rsync arguments, run by the real rsync on a tree shaped like a developer's checkout."""
    import shutil
    import subprocess

    from ray.autoscaler._private.command_runner import SSHCommandRunner

    if not shutil.which("rsync"):
        pytest.skip("rsync is not installed")
    config = yaml.safe_load((CLUSTER / name).read_text())
    src, dst = tmp_path / "repo", tmp_path / "node"
    for path in ("serve/app.py", ".venv/bin/python", ".venv/.installed", "artifacts/models/v1/w.bin",
                 "serve/__pycache__/app.cpython-311.pyc", "textserve.egg-info/PKG-INFO", ".git/HEAD",
                 ".pytest_cache/v/x", "cluster/aws.yaml"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_text("x")
    shutil.copy(CLUSTER.parent / ".gitignore", src / ".gitignore")
    runner = SSHCommandRunner.__new__(SSHCommandRunner)
    args = runner._create_rsync_filter_args({"rsync_exclude": config["rsync_exclude"],
                                             "rsync_filter": config["rsync_filter"]})
    subprocess.run(["rsync", "-avz", *args, f"{src}/", f"{dst}/"], check=True, capture_output=True, cwd=src)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == [".gitignore", "cluster/aws.yaml", "serve/app.py"]


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_secrets_reach_every_ray_start_from_a_file_outside_the_repo(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["file_mounts"]["~/.textserve/secrets.env"] == "~/.textserve/secrets.env"
    assert any("chmod 600" in c and "~/.textserve/secrets.env" in c for c in config["setup_commands"])
    for command in _ray_starts(config):
        before = command.split("ray start")[0]
        source = before.find("set -a && . ~/.textserve/secrets.env && set +a")
        # sourced before `serve env`, which keeps the shared TEXTSERVE_INGRESS_SECRET (it makes a
        # random one per node only when it is unset) and before `ray start`, whose raylet and
        # workers inherit it
        assert 0 <= source < before.find("python -m serve env"), command
    serve = (CLUSTER / "serve_cluster.yaml").read_text()
    assert "TEXTSERVE_FEEDBACK_TOKEN:" not in serve and "TEXTSERVE_INGRESS_SECRET" not in serve
    assert yaml.safe_load(serve)["applications"][0]["args"]["operator_token_env"] == "TEXTSERVE_OPERATOR_TOKEN"


def test_serve_env_keeps_a_shared_ingress_secret(monkeypatch):
    import shutil
    import tempfile

    from serve.ingress import SECRET_ENV, fast_ingress_env

    monkeypatch.setenv(SECRET_ENV, "one-secret-for-every-node")
    run_dir = Path(tempfile.mkdtemp(prefix="tsi", dir="/tmp"))  # HAProxy's socket paths: short
    assert fast_ingress_env(run_dir)[SECRET_ENV] == "one-secret-for-every-node"
    monkeypatch.delenv(SECRET_ENV)
    try:
        assert fast_ingress_env(run_dir)[SECRET_ENV] != "one-secret-for-every-node"  # random when unset
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# --- cluster/kuberay.yaml against the real CRDs of the versions we name ---

CRDS = Path(__file__).with_name("data") / "kuberay_crd"


def _strict(schema):
    """A CRD's openAPIV3Schema as a JSON schema that refuses unknown fields (kubectl's strict field
    validation; the API server alone would prune them silently), except where the CRD keeps them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _crd_errors(version: str, doc: dict) -> list[str]:
    import gzip
    import json

    crd = json.loads(gzip.decompress((CRDS / f"rayservice_v1_{version}.json.gz").read_bytes()))
    assert crd["source"].startswith(f"ray-project/kuberay {version} ")
    validator = jsonschema.Draft7Validator(_strict(crd["openAPIV3Schema"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_kuberay_manifest_needs_exactly_the_version_it_states():
    text = _manifest()
    assert text.startswith("# kubectl apply -f cluster/kuberay.yaml   (KubeRay operator v1.6.0 or newer;")
    assert _crd_errors("v1.6.0", rayservice(text)) == []
    # v1.5.1's CRD has authOptions.mode but not secretName: the manifest does not fit it
    older = _crd_errors("v1.5.1", rayservice(text))
    assert older and all("secretName" in e for e in older), older
    # the real schema catches what Kubernetes would refuse
    typo = rayservice(text)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imag"] = "x"
    assert any("imag" in e for e in _crd_errors("v1.6.0", typo))
    bad_mode = rayservice(text)
    bad_mode["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"
    assert _crd_errors("v1.6.0", bad_mode)


def _pod_specs(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_kuberay_mounts_the_log_only_on_the_learners_pod():
    service = rayservice(_manifest())
    pods = _pod_specs(service)
    claims = {name: [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
              for name, pod in pods.items()}
    assert claims == {"head": ["textserve-shared"], "cpu-serving": [], "gpu-trainer": []}
    assert all("volumeMounts" not in c for name, pod in pods.items() if name != "head" for c in pod["containers"])
    # the head is the learner's node
    assert '\\"learner\\": 1' in service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["learner"]["state_dir"].startswith("/mnt/shared/")
    assert pods["head"]["securityContext"] == {"fsGroup": 1000}  # the image's user may write it


def test_kuberay_never_runs_a_second_cluster_on_the_log():
    service = rayservice(_manifest())
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}
    assert "upgradeStrategy None: KubeRay never starts a" in _manifest()  # the header says what it does


def test_kuberay_secrets_reach_every_ray_container_from_one_secret():
    text = _manifest()
    service = rayservice(text)
    for name, pod in _pod_specs(service).items():
        for container in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            assert "textserve-secrets" in refs, name
            assert not any(e["name"].startswith("TEXTSERVE_") for e in container.get("env", [])), name
    assert 'kubectl create secret generic textserve-secrets --from-env-file="$HOME/.textserve/secrets.env"' in text


# --- cluster/Dockerfile: what can be checked without a container runtime ---

def _dockerfile() -> list[tuple[str, str]]:
    import re

    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_the_package_from_the_repo():
    import fnmatch
    import tomllib

    steps = _dockerfile()
    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())
    base = next(arg for op, arg in steps if op == "FROM")
    assert base.startswith("python:3.11-"), base  # requires-python >=3.11,<3.12
    assert project["project"]["requires-python"] == ">=3.11,<3.12"
    copied = [c for arg in (a for op, a in steps if op == "COPY") for c in arg.split()[:-1]]
    ignored = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in copied:
        if source.startswith("--"):
            continue
        assert (CLUSTER.parent / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    # every package pip needs to build, and the readme pyproject names
    needed = set(project["tool"]["setuptools"]["packages"]) | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= set(copied), needed - set(copied)
    for pattern in (".venv", "artifacts", "**/__pycache__", ".git"):
        assert pattern in ignored
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert 'pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"' in run
    assert "wget" in run  # KubeRay's probes run wget
    assert ("ARG", 'EXTRAS=""') in steps and "gpu" in project["project"]["optional-dependencies"]
    assert next(arg for op, arg in steps if op == "USER") == "ray" and "--uid 1000" in run


def test_dockerfile_image_matches_the_manifest():
    import re
    import tomllib

    text = _manifest()
    service = rayservice(text)
    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())
    ray_pin = next(d for d in project["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith("==" + service["spec"]["rayClusterConfig"]["rayVersion"])
    images = {name: pod["containers"][0]["image"] for name, pod in _pod_specs(service).items()}
    version = project["project"]["version"]
    assert images == {"head": f"your-registry/textserve:{version}", "cpu-serving": f"your-registry/textserve:{version}",
                      "gpu-trainer": f"your-registry/textserve:{version}-gpu"}
    builds = re.findall(r"docker build -f cluster/Dockerfile (--build-arg EXTRAS=gpu )?-t (\S+) \.", text)
    assert sorted(builds) == sorted([("", images["head"]), ("--build-arg EXTRAS=gpu ", images["gpu-trainer"])])


def test_the_image_puts_the_fast_ingress_in_kuberays_ray_start_only(tmp_path):
    """KubeRay runs `/bin/bash -c -- "... ray start ..."` (v1.6.0 GetContainerCommand; no login shell
    by default since v1.4.0): BASH_ENV is the one hook every such bash reads. Run for real here."""
    import shutil
    import subprocess
    import tempfile

    steps = _dockerfile()
    assert ("COPY", "cluster/ray_start_env.sh /etc/textserve/ray_start_env.sh") in steps
    assert any(op == "ENV" and "BASH_ENV=/etc/textserve/ray_start_env.sh" in arg for op, arg in steps)
    import sys

    run_dir = tempfile.mkdtemp(prefix="tsk", dir="/tmp")  # HAProxy's socket paths: short
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "BASH_ENV": str(CLUSTER / "ray_start_env.sh"),
           "TEXTSERVE_INGRESS_DIR": f"{run_dir}/i", "TEXTSERVE_INGRESS_SECRET": "shared-by-every-pod",
           "PYTHONPATH": str(CLUSTER.parent), "HOME": str(tmp_path)}
    show = 'echo "secret=$TEXTSERVE_INGRESS_SECRET haproxy=$RAY_SERVE_ENABLE_HA_PROXY bin=$RAY_SERVE_HAPROXY_BINARY_PATH"'
    try:
        start = subprocess.run(["bash", "-c", "--", f"ulimit -n 1024; true ray start --block; {show}"],
                               env=env, capture_output=True, text=True, timeout=120)
        probe = subprocess.run(["bash", "-c", f"wget -q -O- http://localhost:52365/ || true; {show}"],
                               env=env, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert start.returncode == 0, start.stderr[-2000:]
    assert f"secret=shared-by-every-pod haproxy=1 bin={run_dir}/i/haproxy" in start.stdout, start.stdout
    assert "haproxy= bin=" in probe.stdout, probe.stdout  # a probe's bash is left alone
