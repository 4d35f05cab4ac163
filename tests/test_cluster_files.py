"""Every cluster file is authenticated and complete: token auth on every `ray start`, no
dashboard on all addresses without it, the KubeRay manifest valid against KubeRay's RayService
schema, self-contained, and serving exactly cluster/serve_cluster.yaml. Offline, no cluster."""

from __future__ import annotations

import copy
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
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # a reference to an object nobody defines is caught
    broken = text.replace("claimName: textserve-shared", "claimName: textserve-other", 1)
    assert any("PersistentVolumeClaim textserve-other" in p for p in manifest_reference_problems(broken, "k"))
    undocumented = text.replace("kubectl create secret generic textserve-feedback", "kubectl create secret x")
    assert any("Secret textserve-feedback" in p for p in manifest_reference_problems(undocumented, "k"))


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


def _cli_help(cli: str, sub: list[str]) -> str:
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / cli)
    proc = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (cli, sub, proc.stderr[-2000:])
    return proc.stdout


def _check_flags(cli: str, argv: list[str]) -> None:
    sub = argv[:2] if argv[0] == "job" else argv[:1]
    help_text = _cli_help(cli, sub)
    for arg in argv[len(sub):]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in help_text, f"{cli} {' '.join(sub)} has no {arg.split('=')[0]}"
        elif arg.endswith(".yaml"):
            assert (CLUSTER.parent / arg).exists(), arg


def _check_python_m_train(argv: list[str]) -> None:
    from train.__main__ import parse_args

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
        else:  # pip, export, cd, kubectl: nothing to run them against here
            not_here.append(argv[0])
            continue
        checked.append(" ".join(argv))
    fine_tune = [c for c in checked if "--fine-tune" in c]
    assert fine_tune and all("--storage-path" in c for c in fine_tune)  # multi-node runs need it
    assert any(c.startswith("ray get-auth-token --generate") for c in checked)
    assert set(not_here) <= {"pip", "export", "cd", "kubectl"}, not_here
