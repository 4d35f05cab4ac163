"""The model store: numbered, committed versions of saved models under one root.

Over ~400 lines on purpose: claims, publish, the commit marker, listing and retention share one
protocol between concurrent publishers on object stores without rename, kept in one file so it is
read and changed together.

The root is a local folder by default, or any URI pyarrow's filesystems understand (s3://, gs://,
hdfs://; options such as `s3://bucket/models?endpoint_override=127.0.0.1:9000&scheme=http` stay
at the end of the URI), so a cluster can share one store. Object stores cannot rename folders, so
a version is written in place and committed by a marker written last:

    v000007/_claims/<token>    written first: claims the number (see `_claim`)
    v000007/<model files>      the files `save_model_dir` wrote
    v000007/_COMMITTED         written last: JSON with who, when, and every file with its size

On a local folder every file and folder of the version is fsynced before the marker is renamed
into place, and the marker and the rename after it, so a marker that survives a power loss never
vouches for empty or missing weights (the learner compacts its log against such a snapshot).

Readers (`versions`, `latest`, `metrics`, `load`) see only committed versions. A crashed publish
leaves an uncommitted prefix; `gc`, and every later publish, deletes it once nothing in it has
changed for `grace_s`. A publish stalled longer than `grace_s` may be collected, so `grace_s` must
exceed the longest upload of one file. An age is the collecting host's wall clock minus the
mtime the storage gave the newest file (the NFS or object server's clock, or the writing host's on
a local folder), so it compares clocks across hosts: a collector whose clock runs ahead of the
storage's by `skew` collects a publish stalled `grace_s - skew`; the skew tolerated is `grace_s`
minus the longest upload of one file (with the default 900 s and uploads under 5 min, 10 min of
skew; NTP keeps hosts within a second). A clock behind only delays collection. A publish checks before each file after the first, before
its marker and after it, that its claim is still the only one and every file it wrote is there at
its size; otherwise it removes its claim (and its own marker) and raises ClaimLost: a collected
prefix never gets a marker, and a publisher that took the number meanwhile keeps its files (one
window stays: a file being uploaded while the number changes hands, which needs a stall past
`grace_s` inside that very file).

Version numbers: a publisher writes a claim object with a unique token into the prefix, then lists
the prefix; it owns the number only if its claim is the only file there, and otherwise deletes its
claim and moves on (or, for an explicit version, raises `VersionTaken`). On a store whose writes
are visible to every later listing (local folders; S3 since December 2020; GCS) two publishers can
never both own one number: each would have listed before the other's claim landed, and each listed
after writing its own. They can both lose one round; retries with jitter resolve that. A winner
never deletes its claim, so a committed or in-progress version always blocks later claimers; only
`gc` deletes a prefix, and only a committed version below the newest or an uncommitted one untouched
for `grace_s`. A prefix with no files (pyarrow leaves empty folder objects behind a deleted claim on
S3) counts as free. Numbers of crashed publishes are not reused while their leftovers exist.

Reservations: a publisher that numbers versions it has not stored yet (the online learner numbers
every publish but snapshots only some) writes `_reserved/<owner>.json` ({"up_to": N}) before it
uses a number, then lists the claims and goes above them; a publisher taking the next number goes
above every reservation, and after its claim reads the reservations again and moves above any that
appeared meanwhile. Either the reserver sees the claim or the claimer sees the reservation, so a
number never names two models. The highest `up_to` of all reservations counts, and each writer
writes only its own object (the online learner's name carries its ownership epoch), so a late
write of a superseded learner cannot lower the reservation of the one that replaced it: the
equivalent of a conditional write, with plain PUTs that S3, GCS and every filesystem have.

Remote versions load through one bounded local cache (train/store_cache.py), not a temp copy each.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pyarrow import fs as pafs

from train.store_cache import ModelCache, redact

_VERSION = re.compile(r"^v(\d{6})$")
DEFAULT_STORE = "artifacts/models"
MARKER = "_COMMITTED"
CLAIMS = "_claims"
RESERVED = "_reserved"
PINS = "_pins"
DEFAULT_GRACE_S = 900.0  # well above one file's upload (a 320 MB large model at 1 MB/s is ~5 min)


class ClaimLost(RuntimeError):
    """A publish's number was collected (stalled past `grace_s`) or taken while it uploaded:
    nothing was committed."""


class VersionTaken(ValueError):
    """The explicit version asked for exists, is claimed by another publish, or is not above the newest."""


def default_store_uri() -> str:
    """`TEXTSERVE_MODEL_STORE` when set, else ./artifacts/models (absolute, so Ray workers agree)."""
    uri = os.environ.get("TEXTSERVE_MODEL_STORE", DEFAULT_STORE)
    return uri if "://" in uri else str(Path(uri).resolve())


@dataclass(frozen=True)
class VersionInfo:
    """One version prefix as `python -m train store ls` shows it."""

    version: int
    committed: bool
    files: int
    bytes: int
    age_s: float | None  # since the last write into the prefix (None: the filesystem gave no times)
    kind: str | None = None  # metrics.json "kind" (fine-tune, online-snapshot; None: a plain training run)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Prefix:
    files: dict  # name relative to the version prefix -> pafs.FileInfo

    @property
    def claims(self) -> list[str]:
        return sorted(n.split("/", 1)[1] for n in self.files if n.startswith(CLAIMS + "/"))

    def age_s(self, now: float) -> float | None:
        times = [i.mtime.timestamp() for i in self.files.values() if i.mtime is not None]
        return now - max(times) if times else None


class ModelStore:
    def __init__(self, uri: str | None = None, *, cache_dir: str | Path | None = None,
                 cache_keep: int | None = None, grace_s: float = DEFAULT_GRACE_S):
        self.uri = uri or default_store_uri()
        if "://" not in self.uri:
            self.uri = str(Path(self.uri).resolve())
        self._fs, self._root = pafs.FileSystem.from_uri(self.uri)
        self._root = self._root.rstrip("/")
        self._fs.create_dir(self._root, recursive=True)
        self.grace_s = grace_s
        self._cache = None if self.is_local else ModelCache(self.uri, cache_dir, cache_keep)

    def __repr__(self) -> str:
        return f"ModelStore({redact(self.uri)!r})"

    @property
    def shown(self) -> str:
        """The URI as messages and logs show it: without credentials (pyarrow accepts them in it)."""
        return redact(self.uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    @property
    def cache(self) -> ModelCache | None:
        """The local cache remote versions load through (None for a local store)."""
        return self._cache

    # -- reading ---------------------------------------------------------------------------
    def _path(self, version: int, name: str = "") -> str:
        return f"{self._root}/v{version:06d}" + (f"/{name}" if name else "")

    def _scan(self) -> dict[int, _Prefix]:
        """Every version prefix with its files, from one (paginated) listing of the root."""
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, recursive=True, allow_not_found=True))
        found: dict[int, _Prefix] = {}
        for info in infos:
            top, _, rest = info.path[len(self._root) + 1:].partition("/")
            if (m := _VERSION.match(top)) and rest and info.type == pafs.FileType.File:
                found.setdefault(int(m.group(1)), _Prefix({})).files[rest] = info
        return found  # prefixes holding no file are left out: free numbers

    def _committed(self, prefix: _Prefix) -> bool:
        if MARKER in prefix.files:
            return True
        # A local version written before markers existed (folder renamed into place: complete).
        return self.is_local and not prefix.claims and "metrics.json" in prefix.files

    def versions(self) -> list[int]:
        return sorted(v for v, p in self._scan().items() if self._committed(p))

    def numbers(self) -> tuple[list[int], list[int]]:
        """(committed versions, numbers of publishes in progress or crashed), from one listing:
        a number moving from the second to the first between two listings cannot be missed."""
        scan = self._scan()
        committed = sorted(v for v, p in scan.items() if self._committed(p))
        return committed, sorted(set(scan) - set(committed))

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def version_uri(self, version: int) -> str:
        base, sep, query = self.uri.partition("?")  # pyarrow's URI options stay at the end
        return f"{base.rstrip('/')}/v{version:06d}{sep}{query}"

    def commit_record(self, version: int) -> dict:
        """The version's `_COMMITTED` record; FileNotFoundError when it is not a committed version."""
        try:
            with self._fs.open_input_stream(self._path(version, MARKER)) as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            if self.is_local and version in self.versions():  # pre-marker local version
                names = sorted(p.name for p in Path(self._path(version)).iterdir() if p.is_file())
                return {"version": version, "token": "legacy",
                        "files": {n: Path(self._path(version), n).stat().st_size for n in names}}
            raise FileNotFoundError(f"model version {version} not in {self.shown} (has {self.versions()})") from None

    def describe(self) -> list[VersionInfo]:
        """Every version prefix, committed or not, oldest first."""
        now, out = time.time(), []
        for v, prefix in sorted(self._scan().items()):
            committed = self._committed(prefix)
            kind = self.metrics(v).get("kind") if committed else None
            out.append(VersionInfo(v, committed, len(prefix.files), sum(i.size or 0 for i in prefix.files.values()),
                                   prefix.age_s(now), kind))
        return out

    def local_path(self, version: int) -> Path:
        """A local folder with that version's files: the store's own on a local store, else the
        version's folder in the local cache (valid until a later load evicts it)."""
        if self.is_local:
            self.commit_record(version)  # raises for a missing or uncommitted version
            return Path(self._path(version))
        return self._cache.fetch(self, version)

    def metrics(self, version: int) -> dict:
        """A version's metrics.json alone (cheap: no weights)."""
        with self._fs.open_input_stream(self._path(version, "metrics.json")) as f:
            return json.loads(f.read().decode("utf-8"))

    def load(self, version: int | None = None):
        """Load a version (the newest by default) as a LoadedModel with `.version` set."""
        from train.model import load_model_dir

        if version is None:
            version = self.latest()
            if version is None:
                raise FileNotFoundError(
                    f"no model in {self.shown}; train one first: python -m train --size small"
                )
        if self.is_local:
            loaded = load_model_dir(self.local_path(version))
        else:
            with self._cache.use(self, version) as path:  # no eviction while the files are read
                loaded = load_model_dir(path)
        loaded.version = version
        return loaded

    def read_file(self, version: int, name: str, dest: Path) -> int:
        """Copy one file of a version to a local path; returns the bytes written."""
        with self._fs.open_input_stream(self._path(version, name)) as src, open(dest, "wb") as out:
            return _copy(src, out)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, local_dir: str | Path, version: int | None = None) -> int:
        """Upload a saved model folder as `version` (default: the next free number) and commit it."""
        local_dir = Path(local_dir)
        # The store's own bookkeeping is not part of a model (a version folder can be published
        # into another store as it is).
        files = sorted(p for p in local_dir.rglob("*") if p.is_file()
                       and p.relative_to(local_dir).parts[0] not in (MARKER, CLAIMS) and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{local_dir} holds no files to publish")
        version, token = self._claim_next() if version is None else self._claim_exact(version)
        written = {}
        try:
            for k, path in enumerate(files):
                name = path.relative_to(local_dir).as_posix()
                if k:  # still ours: never write over the files of a publisher that took the number since
                    self._check_claim(version, token, written)
                with open(path, "rb") as src, self._open_out(self._path(version, name)) as out:
                    written[name] = _copy(src, out)
            record = {"version": version, "token": token, "host": socket.gethostname(), "pid": os.getpid(),
                      "committed_at": time.time(), "files": written}
            # A publish stalled past grace_s may have been collected (gc, or another publisher's
            # claim) while it uploaded: a marker then would commit a prefix with files missing.
            # Checked before the marker and again after it (a collection between the two).
            self._check_claim(version, token, written)
            if self.is_local:  # the marker must never reach the disk before the files it vouches for
                _fsync_tree(Path(self._path(version)), written)
            self._write_marker(version, json.dumps(record, indent=1).encode("utf-8"))
            self._check_claim(version, token, written, marker=True)
        except ClaimLost:
            self._remove_own(version, token)  # the number may be someone else's now
            raise
        except Exception:
            self._remove(version, self._scan().get(version))  # our own claim: no one else writes here
            raise
        return version

    def _check_claim(self, version: int, token: str, written: dict, marker: bool = False) -> None:
        """Raise ClaimLost unless the prefix still holds our claim and every file we wrote, at its
        size (and, with `marker`, our marker). Other claims may be there for a moment: a later
        claimer writes its claim, sees ours and deletes its own (`_claim`); a collected prefix or a
        number claimed anew after that shows as our claim gone."""
        there = {i.path[len(self._path(version)) + 1:]: i.size for i in
                 self._fs.get_file_info(pafs.FileSelector(self._path(version), recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File}
        claims = sorted(n for n in there if n.startswith(CLAIMS + "/"))
        missing = sorted(n for n, size in written.items() if there.get(n) != size)
        if f"{CLAIMS}/{token}" not in claims or missing or (marker and MARKER not in there):
            raise ClaimLost(f"version {version} in {self.shown} was collected or claimed by another publish while "
                            f"this one uploaded (claims {claims}, files missing or changed: {missing[:5]}); "
                            f"nothing was committed: publish again (grace_s {self.grace_s:g} s must exceed the "
                            f"longest upload of one file)")

    def _remove_own(self, version: int, token: str) -> None:
        """Delete our marker (if we wrote one) and our claim, nothing else: another publisher may
        own the number now and have written files of the same names. Files left behind are an
        uncommitted prefix's, collected after grace_s."""
        try:
            with self._fs.open_input_stream(self._path(version, MARKER)) as f:
                if json.loads(f.read()).get("token") == token:
                    self._fs.delete_file(self._path(version, MARKER))
        except (FileNotFoundError, ValueError):
            pass
        try:
            self._fs.delete_file(self._path(version, f"{CLAIMS}/{token}"))
        except FileNotFoundError:
            pass

    def _open_out(self, path: str):
        if self.is_local:  # object stores have no folders to make
            self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self._fs.open_output_stream(path)

    def _write_marker(self, version: int, data: bytes) -> None:
        if self.is_local:  # a local write is visible while it happens: write aside, rename (atomic)
            tmp = self._path(version, f".{MARKER}.{uuid.uuid4().hex}")
            with self._open_out(tmp) as out:
                out.write(data)
            _fsync_path(tmp)
            self._fs.move(tmp, self._path(version, MARKER))
            _fsync_path(self._path(version))  # the rename itself, durable before publish returns
        else:  # one PUT: the object appears whole or not at all
            with self._open_out(self._path(version, MARKER)) as out:
                out.write(data)

    def _claim(self, version: int) -> str | None:
        """Claim `version`; the claim's token if this publisher owns the number, else None."""
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        claim = self._path(version, f"{CLAIMS}/{token}")
        with self._open_out(claim) as out:
            out.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}).encode())
        there = [i.path for i in self._fs.get_file_info(pafs.FileSelector(self._path(version), recursive=True))
                 if i.type == pafs.FileType.File]
        if there == [claim]:  # alone (and still there: no gc removed the prefix meanwhile)
            return token
        try:
            self._fs.delete_file(claim)  # lost: another claim, or files, were there first
        except FileNotFoundError:
            pass
        return None

    def reserve(self, owner: str, up_to: int) -> None:
        """Keep the numbers up to `up_to` for `owner` (see the module doc); one object per owner."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", owner):
            raise ValueError(f"reservation owner {owner!r}: letters, digits, _ . - only")
        self._write_object(f"{self._root}/{RESERVED}/{owner}.json",
                           json.dumps({"up_to": int(up_to), "at": time.time(), "host": socket.gethostname()}).encode())

    def reserved(self) -> int:
        """The highest number any reservation keeps (0 without reservations)."""
        return max(self.reservations().values(), default=0)

    def reservations(self) -> dict[str, int]:
        """Every reservation: owner -> the number it keeps up to."""
        infos = self._fs.get_file_info(pafs.FileSelector(f"{self._root}/{RESERVED}", allow_not_found=True))
        found = {}
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(".json"):
                try:
                    with self._fs.open_input_stream(info.path) as f:
                        found[info.path.rsplit("/", 1)[-1][:-len(".json")]] = int(json.loads(f.read())["up_to"])
                except FileNotFoundError:
                    continue  # deleted or being replaced meanwhile
        return found

    def unreserve(self, owner: str) -> None:
        """Drop `owner`'s reservation (one the caller's own covers)."""
        try:
            self._fs.delete_file(f"{self._root}/{RESERVED}/{owner}.json")
        except FileNotFoundError:
            pass

    def pin(self, version: int, owner: str, ttl_s: float = 6 * 3600) -> None:
        """Keep `version` from `gc` while `owner` (e.g. a fine-tune reading it) needs it, at most
        `ttl_s` (a crashed owner's pin expires)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", owner):
            raise ValueError(f"pin owner {owner!r}: letters, digits, _ . - only")
        self._write_object(f"{self._root}/{PINS}/{owner}.json",
                           json.dumps({"version": int(version), "until": time.time() + ttl_s}).encode())

    def unpin(self, owner: str) -> None:
        try:
            self._fs.delete_file(f"{self._root}/{PINS}/{owner}.json")
        except (FileNotFoundError, OSError):
            pass

    def pinned(self) -> set[int]:
        """Versions some owner still pins (expired pins ignored)."""
        now, found = time.time(), set()
        for info in self._fs.get_file_info(pafs.FileSelector(f"{self._root}/{PINS}", allow_not_found=True)):
            if info.type == pafs.FileType.File and info.path.endswith(".json"):
                try:
                    with self._fs.open_input_stream(info.path) as f:
                        pin = json.loads(f.read())
                    if pin["until"] > now:
                        found.add(int(pin["version"]))
                except FileNotFoundError:
                    continue  # unpinned meanwhile; any other error fails gc rather than ignore a pin
        return found

    def highest_number(self) -> int:
        """The highest version number in any prefix, committed, in progress or crashed (0 if none)."""
        return max(self._scan(), default=0)

    def _write_object(self, path: str, data: bytes) -> None:
        if self.is_local:  # write aside and rename: readers never see half of it
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with self._open_out(tmp) as out:
                out.write(data)
            self._fs.move(tmp, path)
        else:  # one PUT: whole or not at all
            with self._open_out(path) as out:
                out.write(data)

    def _claim_next(self) -> tuple[int, str]:
        for attempt in range(50):
            scan = self._scan()
            self._collect_stale(scan, self.grace_s)
            # above every prefix (committed or in progress) and every number reserved
            candidate = max(max(scan, default=0), self.reserved()) + 1
            if token := self._claim(candidate):
                if candidate > self.reserved():
                    return candidate, token
                self._fs.delete_file(self._path(candidate, f"{CLAIMS}/{token}"))  # reserved meanwhile
                continue
            time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # both may lose a round: jitter apart
        raise RuntimeError(f"could not claim a version number in {self.shown} after 50 tries")

    def _claim_exact(self, version: int) -> tuple[int, str]:
        scan = self._scan()
        committed = [v for v, p in scan.items() if self._committed(p)]
        if committed and version <= max(committed):
            raise VersionTaken(f"version {version} is not above the newest in {self.shown} ({max(committed)})")
        if version in scan:  # removing a crashed publish's leftovers here could race another claimer: gc does it
            age = scan[version].age_s(time.time())
            raise VersionTaken(f"version {version} in {self.shown} is claimed by a publish in progress or left by one "
                               f"that failed (last write {'?' if age is None else round(age)} s ago)")
        if token := self._claim(version):
            return version, token
        raise VersionTaken(f"version {version} in {self.shown} was claimed by another publish at the same time")

    # -- retention -------------------------------------------------------------------------
    def gc(self, keep_last: int = 3, keep=(), grace_s: float | None = None, dry_run: bool = False) -> dict:
        """Delete committed versions older than the newest `keep_last` (except those in `keep` or
        pinned, see `pin`) and
        uncommitted prefixes untouched for `grace_s` (default: the store's). Returns what it removed
        (or would remove, with dry_run): {"versions": [...], "uncommitted": [...]}."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (the newest version always stays), got {keep_last}")
        scan = self._scan()
        committed = sorted(v for v, p in scan.items() if self._committed(p))
        retained = set(committed[-keep_last:]) | {int(v) for v in keep}
        old = [v for v in committed if v not in retained]
        if old:
            pinned = self.pinned()  # read after choosing, right before deleting
            old = [v for v in old if v not in pinned]
        for v in [] if dry_run else old:
            self._remove(v, scan[v])
        stale = self._collect_stale(scan, self.grace_s if grace_s is None else grace_s, dry_run)
        return {"versions": old, "uncommitted": stale}

    def _collect_stale(self, scan: dict[int, _Prefix], grace_s: float, dry_run: bool = False) -> list[int]:
        now, stale = time.time(), []
        for v, prefix in sorted(scan.items()):
            age = prefix.age_s(now)
            if not self._committed(prefix) and age is not None and age >= grace_s:
                stale.append(v)
                if not dry_run:
                    self._remove(v, prefix)
        return stale

    def _remove(self, version: int, prefix: _Prefix | None) -> None:
        """The marker first (readers stop seeing the version), then the whole prefix."""
        if prefix is not None and MARKER in prefix.files:
            try:
                self._fs.delete_file(self._path(version, MARKER))
            except FileNotFoundError:
                pass  # another gc got there first
        try:
            self._fs.delete_dir(self._path(version))
        except FileNotFoundError:
            pass


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor flushes a file's or a folder's data too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path, names) -> None:
    """fsync every written file, then every folder holding one (their entries), up to `root`:
    after a power loss a marker that survived never vouches for empty or missing weights."""
    folders = {root}
    for name in names:
        _fsync_path(root / name)
        parent = (root / name).parent
        while parent != root and root in parent.parents:
            folders.add(parent)
            parent = parent.parent
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        _fsync_path(folder)
    _fsync_path(root.parent)  # the version folder's own entry in the store


def _copy(src, out, chunk: int = 8 << 20) -> int:
    total = 0
    while block := src.read(chunk):
        out.write(block)
        total += len(block)
    return total
