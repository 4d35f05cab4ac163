"""The Ray Train job runs end to end on a real local Ray and publishes a loadable version."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests._helpers import write_jsonl
from train.data import DataSpec
from train.job import TrainConfig, run_training
from train.store import ModelStore


def test_train_job_publishes_loadable_version(ray_cluster, tmp_path):
    rows = [{"text": f"please switch on lamp {i}", "label": "on"} for i in range(30)]
    rows += [{"text": f"please switch off lamp {i}", "label": "off"} for i in range(30)]
    data = write_jsonl(tmp_path / "tiny.jsonl", rows)
    cfg = TrainConfig(size="small", data=DataSpec(path=str(data)), epochs=3, batch_size=16,
                      store_uri=str(tmp_path / "store"), storage_path=str(tmp_path / "runs"))
    outcome = run_training(cfg)
    assert outcome.version == 1
    assert set(outcome.metrics) >= {"test_accuracy", "val_accuracy", "samples_per_s", "epoch", "parameters"}
    assert outcome.metrics["samples_per_s"] > 0
    loaded = ModelStore(str(tmp_path / "store")).load()
    assert loaded.version == 1 and loaded.labels == ["off", "on"]
    assert loaded.metrics["test_accuracy"] == outcome.metrics["test_accuracy"]
    assert np.isfinite(loaded.predict(["please switch on lamp 3"])).all()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--langs", "en,xx"], "unsupported language(s) ['xx']"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_rejects_bad_options(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_cli_bad_data_file_named_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\n,greet\n", encoding="utf-8")
    proc = run_cli("--data", str(bad))
    assert proc.returncode == 2 and f"{bad}: row 2: empty or missing 'text'" in proc.stderr


def test_cli_help_lists_every_option():
    out = run_cli("--help").stdout
    for option in ("--size", "--langs", "--data", "--epochs", "--use-gpu", "--store", "--steps-per-epoch"):
        assert option in out


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() == 0, reason="no GPU visible to TensorFlow on this machine")
def test_train_on_gpu(ray_cluster, tmp_path):
    cfg = TrainConfig(size="small", data=DataSpec(langs=("en",)), epochs=1, use_gpu=True,
                      store_uri=str(tmp_path / "store"), storage_path=str(tmp_path / "runs"))
    outcome = run_training(cfg)
    assert "GPU" in outcome.metrics["device"]
