"""Check Serve config files strictly: Serve's own schema, plus unknown keys (Serve accepts typos).

`python -m cluster check FILE...` prints what is wrong and exits non-zero. It checks Serve's
schema (ServeDeploySchema), every key at every level against that schema's fields, the
application `args` against serve.settings.AppSettings, and the Classifier's `user_config`
against BatchSettings. A KubeRay RayService manifest is checked through its `serveConfigV2`.

It also checks that a cluster is authenticated (docs/SCALING.md, "Security"): in a `ray up` file
every `ray start` runs with RAY_AUTH_MODE=token and no dashboard listens on all addresses; a
RayService turns token authentication on (authOptions, or RAY_AUTH_MODE=token in every Ray
container) before its dashboard may listen on the pod address, and every PersistentVolumeClaim,
ConfigMap and Secret it references is defined in the file or, for a Secret, documented in it with
the `kubectl create secret generic NAME` that makes it.
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel


def _model_in(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation, and whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, typing.List):
        inner, _ = _model_in(args[0]) if args else (None, False)
        return inner, True
    for arg in args:  # Optional / Union: the first model found
        inner, is_list = _model_in(arg)
        if inner is not None:
            return inner, is_list
    return None, False


def unknown_keys(model: type[BaseModel], data, where: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    problems = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown key (typo?); allowed: {', '.join(sorted(fields))}")
            continue
        inner, is_list = _model_in(fields[key].annotation)
        if inner is None:
            continue
        for i, item in enumerate(value if is_list and isinstance(value, list) else [value]):
            label = f"{where}.{key}[{i}]" if is_list else f"{where}.{key}"
            problems += unknown_keys(inner, item, label)
    return problems


def check_serve_config(config: dict, source: str = "config") -> list[str]:
    """Every problem found, as 'where: what' lines; empty when the config is good."""
    from ray.serve.schema import ServeDeploySchema

    from serve.settings import AppSettings, BatchSettings, parse_settings

    problems = unknown_keys(ServeDeploySchema, config, source)
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as err:  # pydantic's message lists each field
        problems.append(f"{source}: Serve's schema: {err}")
    for i, app in enumerate(config.get("applications") or []):
        where = f"{source}.applications[{i}]"
        if app.get("import_path", "").startswith("serve.app:"):
            try:
                parse_settings(AppSettings, app.get("args"), f"{where}.args")
            except ValueError as err:
                problems.append(str(err))
        for j, dep in enumerate(app.get("deployments") or []):
            if dep.get("name") == "Classifier" and "user_config" in dep:
                try:
                    parse_settings(BatchSettings, dep["user_config"], f"{where}.deployments[{j}].user_config")
                except ValueError as err:
                    problems.append(str(err))
    return problems


ANY_ADDRESS = {"0.0.0.0", "::", "[::]", "*", ""}
_RAY_START = re.compile(r"\bray start\b")
_TOKEN_MODE = re.compile(r"\bRAY_AUTH_MODE=['\"]?token\b")
_DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\"]*)")


def ray_up_auth_problems(config: dict, source: str) -> list[str]:
    """Every `ray start` of a `ray up` file runs with token auth; no dashboard on all addresses.

    Each start command runs in a shell of its own, so the mode must be set in the same command,
    before `ray start` (`export RAY_AUTH_MODE=token && ... ray start`).
    """
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, command in enumerate(config.get(key) or []):
            for start in _RAY_START.finditer(command):
                where = f"{source}.{key}[{i}]"
                before = command[:start.start()]
                token = _TOKEN_MODE.search(before) and "RAY_AUTH_MODE=disabled" not in before
                if not token:
                    problems.append(f"{where}: `ray start` without RAY_AUTH_MODE=token before it in the same "
                                    "command: anyone who reaches the cluster's ports can run code on it")
                rest = re.split(r"&&|;|\|\|", command[start.end():])[0]
                host = _DASHBOARD_HOST.search(rest)
                if host and host.group(1) in ANY_ADDRESS:
                    problems.append(f"{where}: the dashboard listens on all addresses ({host.group(1) or 'empty'}); "
                                    "bind it to 127.0.0.1 or the head's private address and use `ray dashboard`")
    return problems


def _containers(spec: dict) -> list[tuple[str, dict]]:
    cluster = spec.get("rayClusterConfig") or {}
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{g.get('groupName', i)}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    return [(f"{name}.{c.get('name', j)}", c) for name, group in groups
            for j, c in enumerate(((group.get("template") or {}).get("spec") or {}).get("containers") or [])]


def rayservice_auth_problems(doc: dict, source: str) -> list[str]:
    """Token auth on in every Ray container before the dashboard may listen beyond the pod."""
    spec, problems = doc.get("spec") or {}, []
    cluster = spec.get("rayClusterConfig") or {}
    by_options = (cluster.get("authOptions") or {}).get("mode") == "token"
    env_mode = {where: {e.get("name"): e.get("value") for e in c.get("env") or []}.get("RAY_AUTH_MODE")
                for where, c in _containers(spec)}
    for where, mode in env_mode.items():
        if mode not in (None, "token"):
            problems.append(f"{source}:{where}: RAY_AUTH_MODE={mode} turns token authentication off")
    token = by_options or (env_mode and all(mode == "token" for mode in env_mode.values()))
    if not token:
        problems.append(f"{source}: no token authentication: set rayClusterConfig.authOptions.mode: token "
                        "(KubeRay >= 1.6.0 for secretName) or RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every Ray container")
    # KubeRay passes dashboard-host 0.0.0.0 when rayStartParams leaves it out
    host = str(((cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))
    if host in ANY_ADDRESS and not token:
        problems.append(f"{source}: the dashboard listens on all pod addresses without token authentication")
    return problems


def _walk(node, key: str):
    """Every value stored under `key` anywhere in node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def manifest_reference_problems(text: str, source: str) -> list[str]:
    """Every PVC, ConfigMap and Secret a manifest references is defined, or (a Secret) documented."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    defined = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
    documented = set(re.findall(r"kubectl create secret generic ([a-z0-9][-a-z0-9.]*)", text))
    secrets, claims, config_maps = set(), set(), set()
    for doc in docs:
        claims.update(v["claimName"] for v in _walk(doc, "persistentVolumeClaim") if isinstance(v, dict))
        secrets.update(v["name"] for v in _walk(doc, "secretKeyRef") if isinstance(v, dict))
        secrets.update(v["secretName"] for v in _walk(doc, "secret") if isinstance(v, dict) and "secretName" in v)
        secrets.update(v.get("secretName") for v in _walk(doc, "authOptions") if isinstance(v, dict) and v.get("secretName"))
        config_maps.update(v["name"] for v in _walk(doc, "configMapKeyRef") if isinstance(v, dict))
        config_maps.update(v["name"] for v in _walk(doc, "configMap") if isinstance(v, dict) and "name" in v)
        for ref in _walk(doc, "secretRef"):  # envFrom
            if isinstance(ref, dict):
                secrets.add(ref["name"])
        for ref in _walk(doc, "configMapRef"):
            if isinstance(ref, dict):
                config_maps.add(ref["name"])
    problems = [f"{source}: PersistentVolumeClaim {name} is referenced but not defined in the file"
                for name in sorted(claims) if ("PersistentVolumeClaim", name) not in defined]
    problems += [f"{source}: ConfigMap {name} is referenced but not defined in the file"
                 for name in sorted(config_maps) if ("ConfigMap", name) not in defined]
    problems += [f"{source}: Secret {name} is referenced but neither defined nor documented "
                 f"(a comment with `kubectl create secret generic {name} ...`)"
                 for name in sorted(secrets) if ("Secret", name) not in defined and name not in documented]
    return problems


def check_file(path: str | Path) -> list[str]:
    path = Path(path)
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    problems = []
    for doc in docs:
        if doc.get("kind") == "RayService":
            problems += check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), f"{path.name}:serveConfigV2")
            problems += rayservice_auth_problems(doc, path.name)
        elif "applications" in doc:
            problems += check_serve_config(doc, path.name)
        elif "head_start_ray_commands" in doc or "worker_start_ray_commands" in doc:
            problems += ray_up_auth_problems(doc, path.name)
    if any(doc.get("apiVersion") for doc in docs):
        problems += manifest_reference_problems(text, path.name)
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "check" or len(argv) < 2:
        print("usage: python -m cluster check CLUSTER_FILE.yaml [...]   (Serve configs, ray up files, KubeRay manifests)"
              "\n       python -m cluster kuberay [--check]      (write serve_cluster.yaml into kuberay.yaml)")
        return 2
    bad = 0
    for path in argv[1:]:
        problems = check_file(path)
        bad += bool(problems)
        print(f"{path}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for line in problems:
            print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
