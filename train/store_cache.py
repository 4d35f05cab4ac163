"""One bounded local cache for versions loaded from a remote model store.

Folder: `cache_dir` if given, else $TEXTSERVE_MODEL_CACHE, else ~/.cache/textserve/models; inside,
one folder per store (a hash of its URI without credentials) holding `v000007/` folders. A version
is downloaded to a private folder and renamed into place, so concurrent loaders on one node (several
replicas) never read a half copy; a cached copy counts only while its `_COMMITTED` token matches the
store's (one small read per load), so a store recreated under the same URI is not confused with the
old one. After each load the cache keeps the `keep` most recently used versions (default 3, or
$TEXTSERVE_MODEL_CACHE_KEEP) and deletes the rest. Loaders hold a shared lock while they read, and
eviction runs only when it gets the exclusive lock at once (else the next load evicts), so a folder
is never deleted under a reader of the same cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_KEEP = 3


def default_cache_dir() -> Path:
    env = os.environ.get("TEXTSERVE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "textserve" / "models"


def redact(uri: str) -> str:
    """The URI without user:password@ (pyarrow accepts credentials there)."""
    parts = urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


class ModelCache:
    def __init__(self, store_uri: str, cache_dir: str | Path | None = None, keep: int | None = None):
        self.keep = keep if keep is not None else int(os.environ.get("TEXTSERVE_MODEL_CACHE_KEEP", DEFAULT_KEEP))
        if self.keep < 1:
            raise ValueError(f"the model cache must keep at least 1 version, got {self.keep}")
        key = hashlib.sha256(redact(store_uri).encode()).hexdigest()[:16]
        self.root = Path(cache_dir or default_cache_dir()).expanduser().resolve() / key
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "store_uri.txt").write_text(redact(store_uri) + "\n")  # which store this folder mirrors

    def cached(self) -> list[int]:
        """Versions with a complete copy here."""
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if (p / "_COMMITTED").is_file())

    @contextlib.contextmanager
    def use(self, store, version: int):
        """The version's local folder, not evicted while the block runs; evicts the rest after."""
        with self._lock(fcntl.LOCK_SH):
            path = self._fetch_locked(store, version)
            yield path
        self.evict()

    def fetch(self, store, version: int) -> Path:
        with self.use(store, version) as path:
            return path

    def _fetch_locked(self, store, version: int) -> Path:
        record = store.commit_record(version)  # FileNotFoundError for a missing or uncommitted version
        dest = self.root / f"v{version:06d}"
        if self._matches(dest, record):
            os.utime(dest)  # most recently used
            return dest
        partial = self.root / f".partial-{uuid.uuid4().hex}"
        partial.mkdir()
        try:
            for name, size in record["files"].items():
                target = partial / name
                target.parent.mkdir(parents=True, exist_ok=True)
                got = store.read_file(version, name, target)
                if got != size:
                    raise OSError(f"{store.uri} v{version}: {name} has {got} bytes, its commit record says {size}")
            (partial / "_COMMITTED").write_text(json.dumps(record))
            if dest.exists():  # a copy of another store under this URI: set it aside, then delete it
                old = self.root / f".old-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):
                    dest.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                partial.rename(dest)
            except OSError:  # another loader on this node put the same version in place first
                if not self._matches(dest, record):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return dest

    @staticmethod
    def _matches(dest: Path, record: dict) -> bool:
        try:
            return json.loads((dest / "_COMMITTED").read_text()).get("token") == record.get("token")
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return False

    def evict(self) -> list[int]:
        """Delete all but the `keep` most recently used versions; [] when a reader holds the cache."""
        try:
            with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB):
                folders = sorted(self.root.glob("v[0-9]*"), key=lambda p: p.stat().st_mtime, reverse=True)
                gone = folders[self.keep:] + list(self.root.glob(".partial-*")) + list(self.root.glob(".old-*"))
                for path in gone:  # no reader or downloader holds the lock: partial copies are dead
                    shutil.rmtree(path, ignore_errors=True)
                return sorted(int(p.name[1:]) for p in gone if p.name.startswith("v"))
        except BlockingIOError:
            return []

    @contextlib.contextmanager
    def _lock(self, mode: int):
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, mode)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
