"""Check Serve config files strictly: Serve's own schema, plus unknown keys (Serve accepts typos).

`python -m cluster check FILE...` prints what is wrong and exits non-zero. It checks Serve's
schema (ServeDeploySchema), every key at every level against that schema's fields, the
application `args` against serve.settings.AppSettings, and the Classifier's `user_config`
against BatchSettings. A KubeRay RayService manifest is checked through its `serveConfigV2`.
"""

from __future__ import annotations

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


def check_file(path: str | Path) -> list[str]:
    path = Path(path)
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    problems = []
    for doc in docs:
        if doc.get("kind") == "RayService":
            problems += check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), f"{path.name}:serveConfigV2")
        elif "applications" in doc:
            problems += check_serve_config(doc, path.name)
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "check" or len(argv) < 2:
        print("usage: python -m cluster check SERVE_CONFIG.yaml [...]")
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
