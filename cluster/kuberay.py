"""The KubeRay manifest's Serve config is cluster/serve_cluster.yaml, written in, never edited by hand.

`python -m cluster kuberay` rewrites the `serveConfigV2: |` block of cluster/kuberay.yaml with the
text of cluster/serve_cluster.yaml (comments included) and leaves the rest of the manifest as it
is; `--check` only says whether they differ (tests/test_cluster_files.py runs the same check).
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "kuberay.yaml"
SERVE_CONFIG = HERE / "serve_cluster.yaml"
_KEY = "  serveConfigV2: |\n"  # under the RayService's `spec:`
_INDENT = "    "


def render(manifest: str, serve_config: str) -> str:
    """The manifest with its serveConfigV2 block replaced by `serve_config`, indented."""
    start = manifest.index(_KEY) + len(_KEY)
    end = start
    lines = manifest[start:].splitlines(keepends=True)
    for line in lines:  # the block ends at the first non-blank line indented less than it
        if line.strip() and not line.startswith(_INDENT):
            break
        end += len(line)
    block = "".join(_INDENT + line if line.strip() else "\n" for line in serve_config.splitlines(keepends=True))
    if not block.endswith("\n"):
        block += "\n"
    return manifest[:start] + block + manifest[end:]


def rayservice(manifest: str) -> dict:
    return next(d for d in yaml.safe_load_all(manifest) if d and d.get("kind") == "RayService")


def drift(manifest_path: Path = MANIFEST, serve_path: Path = SERVE_CONFIG) -> str | None:
    """Why the manifest's Serve config differs from serve_cluster.yaml, or None when it does not."""
    inline = yaml.safe_load(rayservice(manifest_path.read_text())["spec"]["serveConfigV2"])
    if inline != yaml.safe_load(serve_path.read_text()):
        return (f"{manifest_path.name}'s serveConfigV2 differs from {serve_path.name}: "
                "run `python -m cluster kuberay` to write it in")
    return None


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--check":
        problem = drift()
        print(problem or f"{MANIFEST.name}: serveConfigV2 is {SERVE_CONFIG.name}")
        return 1 if problem else 0
    MANIFEST.write_text(render(MANIFEST.read_text(), SERVE_CONFIG.read_text()))
    print(f"wrote {SERVE_CONFIG.name} into {MANIFEST.name} (serveConfigV2)")
    return 0
