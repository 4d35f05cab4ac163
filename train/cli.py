"""python -m train (without `store`): train a classifier with Ray Train and publish it to the model
store. Imports Keras and Ray; `python -m train store` (train/store_cli.py) needs neither."""

from __future__ import annotations

import argparse
import json
import sys

from train.data import SLOT_MODES, SPLIT_MODES, SUPPORTED_LANGS, DataFileError, DataSpec
from train.augment import KINDS as AUGMENT_KINDS
from train.job import DEFAULT_ARCH, DEFAULT_CHAR_NGRAMS, DEFAULT_EPOCHS, TrainConfig
from train.model import ARCHS, SIZES, features_name
from train.evaluate import format_summary
from train.store_cache import redact


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a text classifier with Ray Train and publish it as a new model-store version.",
        epilog="python -m train store ls|gc [--store URI] shows the store's versions and deletes old ones.",
    )
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="model size: small (tests, demo) or large (300-d embedding, ~80M parameters)")
    p.add_argument("--arch", choices=ARCHS,
                   help=f"model family: cnn (embedding -> Conv1D widths 3/4/5 -> max pool) or lstm (embedding -> "
                        f"LSTM); default {DEFAULT_ARCH} for a new model; --fine-tune keeps the base version's family")
    p.add_argument("--char-ngrams", metavar="WIDTHS",
                   help="subword features for a new model: comma-separated character n-gram widths (a token's "
                        "vector is its word row plus the mean of its n-grams' rows), or none: words alone. Default "
                        f"{','.join(map(str, DEFAULT_CHAR_NGRAMS))} for a new model; --fine-tune keeps the base "
                        "version's features. See docs/TRAINING.md for what each measured")
    p.add_argument("--langs", default="en",
                   help=f"comma-separated bundled corpus languages, from {','.join(SUPPORTED_LANGS)} (default: en)")
    p.add_argument("--data", metavar="FILE",
                   help="train on your own .csv (header with text,label) or .jsonl ({text, label} per line) instead")
    p.add_argument("--split", choices=SPLIT_MODES, default="template",
                   help="template (default): each template's sentences in one split, validation/test with unseen "
                        "templates and slot values; sentence: a random split of the sentences (a --data file always uses it)")
    p.add_argument("--slots", choices=SLOT_MODES, default=DataSpec.slots,
                   help=f"training slot values (areas, names, numbers; default {DataSpec.slots}): see docs/TRAINING.md")
    p.add_argument("--augment", default=DataSpec.augment, metavar="KINDS",
                   help=f"extra training copies of the bundled corpus' sentences: kinds joined with + from "
                        f"{'+'.join(AUGMENT_KINDS)}, or none (default: {DataSpec.augment}; see docs/TRAINING.md)")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus expansion and splits (default: 0)")
    p.add_argument("--epochs", type=int,
                   help=f"epochs (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_EPOCHS.items())})")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"batch size (default: {TrainConfig.batch_size})")
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate,
                   help=f"Adam learning rate (default: {TrainConfig.learning_rate})")
    p.add_argument("--steps-per-epoch", type=int, help="cap each epoch at this many batches")
    p.add_argument("--use-gpu", action="store_true",
                   help="train on a GPU (Ray schedules the worker on a node with one); without it training "
                        "runs on CPU. Refused when the Ray cluster has no GPU and cannot start a node with one")
    p.add_argument("--gpus-per-worker", type=float, metavar="N",
                   help="GPUs for the training worker (implies --use-gpu; default 1); N > 1 trains on all of "
                        "them with MirroredStrategy (one node: Keras 3 has no multi-worker strategy)")
    p.add_argument("--store", metavar="URI",
                   help="model store: a folder or s3://, gs://, ... (default: $TEXTSERVE_MODEL_STORE or ./artifacts/models)")
    p.add_argument("--fine-tune", action="store_true",
                   help="start from the newest version in the store and add the feedback log to the training data; "
                        "the running online learner rebases on the result")
    p.add_argument("--include-deferred", action="store_true",
                   help="with --fine-tune: also train on feedback the learner deferred (rounds it held back on its base "
                        "check alone: often a new language, but also what a poisoner relabelled among texts the model "
                        "was unsure of); left out by default")
    p.add_argument("--feedback-dir", default="artifacts/online",
                   help="the learner's state_dir holding the feedback log (default: ./artifacts/online)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves for the training worker")
    p.add_argument("--worker-resources", type=json.loads, default={}, metavar="JSON",
                   help='custom resources for the training worker, e.g. \'{"trainer": 1}\' to run on the training node')
    p.add_argument("--storage-path", default="artifacts/ray_results",
                   help="where Ray Train keeps checkpoints (default: ./artifacts/ray_results)")
    a = p.parse_args(argv)
    try:
        langs = tuple(x.strip() for x in a.langs.split(",") if x.strip())
        char_ngrams = None if a.char_ngrams is None else _widths(a.char_ngrams)
        return TrainConfig(
            size=a.size, arch=a.arch, char_ngrams=char_ngrams, data=DataSpec(langs=langs, path=a.data, seed=a.seed, split=a.split, slots=a.slots, augment=a.augment), epochs=a.epochs,
            batch_size=a.batch_size, learning_rate=a.learning_rate, steps_per_epoch=a.steps_per_epoch,
            use_gpu=a.use_gpu or a.gpus_per_worker is not None, gpus_per_worker=a.gpus_per_worker,
            store_uri=a.store, storage_path=a.storage_path,
            fine_tune=a.fine_tune, feedback_dir=a.feedback_dir, include_deferred=a.include_deferred,
            cpus_per_worker=a.cpus_per_worker,
            worker_resources=a.worker_resources,
        )
    except ValueError as err:
        p.error(str(err))


def _widths(text: str) -> tuple[int, ...]:
    if text.strip() == "none":
        return ()
    try:
        return tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise ValueError(f"--char-ngrams takes comma-separated widths (e.g. 2,3,4) or none, got {text!r}") from None


def _both_accuracies(m: dict) -> str:
    template, sentence = m.get("test_accuracy_template"), m.get("test_accuracy_sentence")
    return (f"  test accuracy, unseen templates and names (template split): "
            f"{'n/a with --split sentence' if template is None else f'{template:.4f}'}; "
            f"new sentences of training templates (sentence split): "
            f"{'n/a' if sentence is None else f'{sentence:.4f}'}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.data.path:  # check the user's file before starting Ray: errors in seconds, not minutes
        from train.data import read_user_file
        try:
            read_user_file(cfg.data.path)
        except DataFileError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from train.job import ArchMismatchError, NoGpuError, run_training

    try:
        outcome = run_training(cfg)
    except (NoGpuError, ArchMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = outcome.metrics
    print(f"\npublished model version {outcome.version} -> {redact(outcome.uri)}")
    print(f"  size {cfg.size}, arch {m['arch']}, features {features_name(m.get('char_ngrams'), m.get('subword_mix') or 'mean')}, "
          f"{m['parameters']:,} parameters, "
          f"best epoch {m['epoch']}")
    print(f"  validation accuracy {m['val_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f} ({m['split']} split)")
    print(_both_accuracies(m))
    print(format_summary(m["confusion"]))
    print(f"  training throughput {m['samples_per_s']:.0f} samples/s on {m['device']}, "
          f"wall {m['train_wall_s']:.0f} s")
    return 0
