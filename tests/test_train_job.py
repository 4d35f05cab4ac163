"""`python -m train`'s command line: refusals before anything starts (in-process, no Ray), its
help, the real CLI refusing --use-gpu without a GPU, and training on a GPU where there is one.

The Ray Train job itself runs end to end in test_store_s3.py (the CLI, words alone, to S3) and
test_cnn_family.py (the default: a CNN on words + char 2/3-grams, then its fine-tune)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train.data import DataSpec
from train.job import TrainConfig, run_training
from train.store import ModelStore


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`python -m train ARGS` in this process (its main, as the module runs it) for a command that
    must be refused before anything starts: (exit code, stderr). In-process, so each case costs
    milliseconds instead of an interpreter start with TensorFlow; reaching Ray or training fails."""
    import ray

    import train.job
    from train.__main__ import main

    def started(*args, **kwargs):
        raise AssertionError("the command was not refused before Ray and training started")
    monkeypatch.setattr(train.job, "run_training", started)
    monkeypatch.setattr(ray, "init", started)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--arch", "rnn"], "invalid choice: 'rnn'"),
        (["--langs", "en,xx"], "unsupported language(s) ['xx']"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--gpus-per-worker", "0"], "gpus_per_worker (0.0) needs use_gpu and a positive number"),
        (["--char-ngrams", "2,x"], "--char-ngrams takes comma-separated widths (e.g. 2,3,4) or none, got '2,x'"),
        (["--char-ngrams", "0,3"], "char_ngrams widths must be distinct, increasing and between 1 and 8, got [0, 3]"),
        (["--char-ngrams", "2,3", "--fine-tune"], "a fine-tune keeps its base version's features"),
    ],
)
def test_cli_rejects_bad_options(args, message, capsys, monkeypatch):
    code, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and message in err, err


def test_cli_features_default_to_char_2_3_grams_for_a_new_model_and_the_base_for_a_fine_tune():
    """No --char-ngrams: a new model gets DEFAULT_CHAR_NGRAMS and a fine-tune its base's (None);
    `none` is words alone; the loop config a fine-tune sends names no features of its own."""
    from train.cli import parse_args
    from train.job import DEFAULT_CHAR_NGRAMS

    assert DEFAULT_CHAR_NGRAMS == (2, 3)
    new = parse_args([])
    assert new.char_ngrams is None and new.new_char_ngrams == DEFAULT_CHAR_NGRAMS
    words = parse_args(["--char-ngrams", "none"])
    assert words.char_ngrams == () and words.new_char_ngrams == ()
    assert parse_args(["--char-ngrams", "4,2,3"]).new_char_ngrams == (2, 3, 4)
    fine = parse_args(["--fine-tune"])
    assert fine.char_ngrams is None and fine.fine_tune


def test_cli_bad_data_file_named_before_ray_starts(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\n,greet\n", encoding="utf-8")
    code, err = run_cli(capsys, monkeypatch, "--data", str(bad))
    assert code == 2 and f"{bad}: row 2: empty or missing 'text'" in err


def test_cli_help_lists_every_option():
    """The real entry point, `python -m train`, in its own interpreter."""
    out = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, timeout=120).stdout
    for option in ("--size", "--arch", "--langs", "--data", "--epochs", "--use-gpu", "--gpus-per-worker", "--store",
                   "--steps-per-epoch", "--char-ngrams"):
        assert option in out


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() == 0, reason="no GPU visible to TensorFlow on this machine")
def test_train_on_gpu(ray_cluster, tmp_path):
    """One GPU: the default strategy; several: --gpus-per-worker N gives the worker all of them
    and the model trains under MirroredStrategy."""
    n = _gpus()
    cfg = TrainConfig(size="small", data=DataSpec(langs=("en",)), epochs=1, use_gpu=True,
                      gpus_per_worker=n if n > 1 else None,
                      store_uri=str(tmp_path / "store"), storage_path=str(tmp_path / "runs"))
    outcome = run_training(cfg)
    device = outcome.metrics["device"]
    assert device.startswith(f"{n} GPU"), device
    assert ("MirroredStrategy" in device) == (n > 1), device


@pytest.mark.integration  # a Ray of its own, in the subprocess
@pytest.mark.skipif(_gpus() > 0, reason="checks the refusal on a machine without a GPU")
def test_cli_refuses_use_gpu_without_a_gpu_before_training(tmp_path):
    """The real `python -m train` in its own interpreter: it starts a local Ray of its own (the
    path a machine without a cluster takes), refuses, and shuts that Ray down."""
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "train", "--use-gpu", "--epochs", "1", "--store", str(store),
                           "--storage-path", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: --use-gpu: the Ray cluster has no node with 1 GPU(s)" in proc.stderr
    assert "train on CPU without --use-gpu" in proc.stderr
    assert "[train] small model" not in proc.stdout + proc.stderr  # no training worker started
    assert not store.exists() or not any(store.iterdir())


def test_a_ray_up_gpu_node_type_counts_as_gpu_capacity(tmp_path):
    from train.job import _autoscaled_gpus

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    assert _autoscaled_gpus(bootstrap) == 0  # not on a ray up head
    bootstrap.write_text("available_node_types:\n  head: {resources: {learner: 1}}\n"
                         "  gpu_trainer: {resources: {GPU: 4, trainer: 1}}\n")
    assert _autoscaled_gpus(bootstrap) == 4


def test_fine_tune_reads_the_log_as_the_gate_marked_it(tmp_path, capsys):
    """Holdout and rejected events never reach a fine-tune; deferred ones (held back on the base
    check alone: a new language, or relabels of texts the model was unsure of) only when asked."""
    from online_learning.feedback_log import FeedbackEvent, FeedbackLog
    from train.job import _fine_tune_inputs
    from train.model import new_model, save_model_dir

    store = ModelStore(str(tmp_path / "store"))
    store.publish(save_model_dir(new_model("small", ["HassTurnOn", "HassTurnOff"]), tmp_path / "base"))
    log = FeedbackLog(tmp_path / "state")
    log.append([FeedbackEvent(f"e{i}", f"text {i}", "HassTurnOn") for i in range(8)])
    log.mark([1], "holdout")
    log.mark([2, 3], "rejected")
    log.mark([4, 5], "deferred")
    log.close()
    texts = {}
    for include in (False, True):
        cfg = TrainConfig(fine_tune=True, feedback_dir=str(tmp_path / "state"), store_uri=str(tmp_path / "store"),
                          include_deferred=include)
        extra, last = _fine_tune_inputs(cfg, store, f"test-{include}")
        texts[include] = sorted(t for t, _ in extra["feedback"])
        assert last == 7
    assert texts[False] == ["text 0", "text 6", "text 7"]
    assert texts[True] == ["text 0", "text 4", "text 5", "text 6", "text 7"]
    out = capsys.readouterr().out
    assert "2 deferred by the learner's base check, left out (--include-deferred trains on them)" in out
    # The learner had judged only up to offset 5 (its state file): a fine-tune reads no further, the
    # learner judges 6 and 7 after it adopts the fine-tune.
    (tmp_path / "state" / "learner_state.json").write_text(json.dumps({"version": 3, "judged_offset": 5}))
    cfg = TrainConfig(fine_tune=True, feedback_dir=str(tmp_path / "state"), store_uri=str(tmp_path / "store"))
    extra, last = _fine_tune_inputs(cfg, store, "test-judged")
    assert last == 5 and sorted(t for t, _ in extra["feedback"]) == ["text 0"]
    assert "events after offset 5, not judged by the learner yet, are left to it" in capsys.readouterr().out
