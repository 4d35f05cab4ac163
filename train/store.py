"""The model store: numbered versions of saved models under one root.

The root is a local folder by default, or any URI pyarrow's filesystems understand (s3://,
gs://, hdfs://), so a cluster can share one store. A version is a folder `v000007` holding the
files `save_model_dir` writes. Versions are written under a temporary name and renamed into
place, so a reader never sees half a version.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from pyarrow import fs as pafs

_VERSION = re.compile(r"^v(\d{6})$")
DEFAULT_STORE = "artifacts/models"


def default_store_uri() -> str:
    """`TEXTSERVE_MODEL_STORE` when set, else ./artifacts/models (absolute, so Ray workers agree)."""
    uri = os.environ.get("TEXTSERVE_MODEL_STORE", DEFAULT_STORE)
    return uri if "://" in uri else str(Path(uri).resolve())


class ModelStore:
    def __init__(self, uri: str | None = None):
        self.uri = uri or default_store_uri()
        if "://" not in self.uri:
            self.uri = str(Path(self.uri).resolve())
        self._fs, self._root = pafs.FileSystem.from_uri(self.uri)
        self._fs.create_dir(self._root, recursive=True)

    def __repr__(self) -> str:
        return f"ModelStore({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    def versions(self) -> list[int]:
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        found = (_VERSION.match(Path(i.path).name) for i in infos if i.type == pafs.FileType.Directory)
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def version_uri(self, version: int) -> str:
        return f"{self.uri.rstrip('/')}/v{version:06d}"

    def publish(self, local_dir: str | Path, version: int | None = None) -> int:
        """Copy a saved model folder in as `version` (default: the next); returns its number."""
        latest = self.latest() or 0
        if version is None:
            version = latest + 1
        elif version <= latest:
            raise ValueError(f"version {version} is not above the newest in {self.uri} ({latest})")
        staging = f"{self._root}/.staging-{uuid.uuid4().hex}"
        self._fs.create_dir(staging, recursive=True)
        pafs.copy_files(str(local_dir), staging, destination_filesystem=self._fs)
        self._fs.move(staging, f"{self._root}/v{version:06d}")
        return version

    def local_path(self, version: int, scratch: str | Path | None = None) -> Path:
        """A local folder with that version's files (the store's own on a local store)."""
        path = f"{self._root}/v{version:06d}"
        if self._fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"model version {version} not in {self.uri} (has {self.versions()})")
        if self.is_local:
            return Path(path)
        target = Path(scratch or tempfile.mkdtemp(prefix=f"model-v{version}-"))
        pafs.copy_files(path, str(target), source_filesystem=self._fs)
        return target

    def metrics(self, version: int) -> dict:
        """A version's metrics.json alone (cheap: no weights)."""
        import json

        with self._fs.open_input_stream(f"{self._root}/v{version:06d}/metrics.json") as f:
            return json.loads(f.read().decode("utf-8"))

    def load(self, version: int | None = None):
        """Load a version (the newest by default) as a LoadedModel with `.version` set."""
        from train.model import load_model_dir

        if version is None:
            version = self.latest()
            if version is None:
                raise FileNotFoundError(
                    f"no model in {self.uri}; train one first: python -m train --size small"
                )
        loaded = load_model_dir(self.local_path(version))
        loaded.version = version
        return loaded
