"""A publish whose prefix is collected while it uploads (stalled past grace_s) commits nothing:
on a real local store here, on a real S3 API in test_store_s3.py. No Ray."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import train.store
from train.store import ClaimLost, ModelStore


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text('{"kind": "test"}')
    for i in range(3):
        (d / f"part{i}.bin").write_bytes(os.urandom(50_000))
    return d


def publish_collected_midway(uri: str, src: Path, monkeypatch) -> tuple[list, ModelStore]:
    """Publish `src` to `uri` in a thread that stalls after its first file; meanwhile another
    store object with grace 0 collects every uncommitted prefix (what gc does to a publish
    stalled longer than grace_s). Returns (what publish returned or raised, the collector)."""
    first_file, collected = threading.Event(), threading.Event()
    real_copy = train.store._copy

    def stalling_copy(src_f, out):  # the upload stalls after the first file until gc has run
        written = real_copy(src_f, out)
        if not first_file.is_set():
            first_file.set()
            assert collected.wait(60)
        return written
    monkeypatch.setattr(train.store, "_copy", stalling_copy)
    outcome: list = []

    def publish():
        try:
            outcome.append(ModelStore(uri).publish(src))
        except Exception as err:  # noqa: BLE001 - the test looks at what it was
            outcome.append(err)
    t = threading.Thread(target=publish)
    t.start()
    assert first_file.wait(60)
    collector = ModelStore(uri, grace_s=0)
    assert collector.gc(keep_last=5)["uncommitted"] == [1]
    collected.set()
    t.join(60)
    assert not t.is_alive()
    return outcome, collector


def test_a_publish_collected_while_it_uploads_commits_nothing_on_a_local_store(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    outcome, store = publish_collected_midway(uri, model_dir(tmp_path), monkeypatch)
    assert isinstance(outcome[0], ClaimLost), outcome
    assert "nothing was committed" in str(outcome[0])
    assert store.versions() == [] and store.latest() is None
    monkeypatch.undo()
    assert ModelStore(uri).publish(model_dir(tmp_path / "again")) >= 1  # the store works on


def test_a_publish_whose_number_another_publisher_took_meanwhile_leaves_that_one_alone(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    src = model_dir(tmp_path)
    first_file, go_on = threading.Event(), threading.Event()
    real_copy = train.store._copy
    stalled = threading.local()

    def stalling_copy(src_f, out):
        written = real_copy(src_f, out)
        if getattr(stalled, "on", False) and not first_file.is_set():
            first_file.set()
            assert go_on.wait(60)
        return written
    monkeypatch.setattr(train.store, "_copy", stalling_copy)
    outcome: list = []

    def slow_publish():
        stalled.on = True
        try:
            outcome.append(ModelStore(uri).publish(src))
        except Exception as err:  # noqa: BLE001
            outcome.append(err)
    t = threading.Thread(target=slow_publish)
    t.start()
    assert first_file.wait(60)
    other = ModelStore(uri, grace_s=0)
    assert other.gc(keep_last=5)["uncommitted"] == [1]
    theirs = model_dir(tmp_path / "other")
    assert other.publish(theirs) == 1  # the number is free again: taken
    go_on.set()
    t.join(60)
    assert isinstance(outcome[0], ClaimLost), outcome
    assert other.versions() == [1]
    stored = Path(other.local_path(1))  # the other's version is whole: its own bytes, none of ours
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == \
        {n: (stored / n).read_bytes() for n in other.commit_record(1)["files"]}
