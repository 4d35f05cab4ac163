"""The Ray Train job: train one model with TensorflowTrainer, publish the best epoch to the store.

One worker: Keras 3 has no MultiWorkerMirroredStrategy (keras-team/keras#20585), so a run uses
one node; several GPUs on that node train together through MirroredStrategy. Ray gives a worker
one GPU unless asked for more (`gpus_per_worker`, `--gpus-per-worker N`), so MirroredStrategy
runs only with N > 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from train.data import DataSpec

DEFAULT_EPOCHS = {"small": 15, "large": 2}
DEFAULT_ARCH = "cnn"  # a new model's family when --arch is not given (docs/TRAINING.md: measured over seeds)
DEFAULT_CHAR_NGRAMS = (2, 3)  # a new model's subword features when --char-ngrams is not given (the same)


@dataclass(frozen=True)
class TrainConfig:
    size: str = "small"
    arch: str | None = None  # lstm or cnn; None: DEFAULT_ARCH, or a fine-tune's base family
    # Subword features of a new model (n-gram widths); () words alone; None: DEFAULT_CHAR_NGRAMS,
    # or a fine-tune's base features.
    char_ngrams: tuple[int, ...] | None = None
    data: DataSpec = field(default_factory=DataSpec)
    epochs: int | None = None  # None: DEFAULT_EPOCHS for the size
    batch_size: int = 64  # the production team's setting
    learning_rate: float = 1e-3
    steps_per_epoch: int | None = None  # cap an epoch (quick throughput measurements)
    use_gpu: bool = False
    gpus_per_worker: float | None = None  # None: Ray's default with use_gpu (one GPU)
    store_uri: str | None = None  # None: the default model store
    storage_path: str = "artifacts/ray_results"  # Ray Train's checkpoints and run state
    cpus_per_worker: float = 1.0
    worker_resources: dict = field(default_factory=dict)  # e.g. {"trainer": 1}: pin to the training node
    fine_tune: bool = False  # start from the newest version and add the feedback log to the data
    feedback_dir: str = "artifacts/online"  # the learner's state_dir (its feedback log)
    include_deferred: bool = False  # also train on feedback the learner held back on its base check alone

    def __post_init__(self) -> None:
        from train.model import check_char_ngrams, size_named

        size_named(self.size)  # raises with the list of sizes
        if self.arch is not None:
            from train.model import arch_named

            arch_named(self.arch)  # raises with the list of families
        if self.char_ngrams is not None:
            check_char_ngrams(self.char_ngrams)
        if self.char_ngrams is not None and self.fine_tune:
            raise ValueError("a fine-tune keeps its base version's features: drop --char-ngrams")
        for name in ("epochs", "batch_size", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.gpus_per_worker is not None and (not self.use_gpu or self.gpus_per_worker <= 0):
            raise ValueError(f"gpus_per_worker ({self.gpus_per_worker}) needs use_gpu and a positive number")

    @property
    def new_char_ngrams(self) -> tuple[int, ...]:
        """The n-gram widths a new model gets."""
        return DEFAULT_CHAR_NGRAMS if self.char_ngrams is None else tuple(self.char_ngrams)

    @property
    def num_epochs(self) -> int:
        return self.epochs or DEFAULT_EPOCHS[self.size]


class ArchMismatchError(ValueError):
    """--fine-tune with an --arch other than the base version's model family."""


def fine_tune_arch(cfg: TrainConfig, store, version: int | None = None) -> str | None:
    """The family a fine-tune continues: the base version's (newest by default; None when the
    store is empty). An explicit other `cfg.arch` is refused: weights cannot change family."""
    from train.model import CONFIG_FILE, saved_arch

    version = store.latest() if version is None else version
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        store.read_file(version, CONFIG_FILE, Path(tmp, CONFIG_FILE))
        base = saved_arch(tmp)
    if cfg.arch is not None and cfg.arch != base:
        raise ArchMismatchError(
            f"--fine-tune continues v{version}, a {base} model; --arch {cfg.arch} cannot start from its weights. "
            f"Drop --arch (or pass --arch {base}), or train a new {cfg.arch} model without --fine-tune")
    return base


@dataclass(frozen=True)
class TrainOutcome:
    version: int
    uri: str
    metrics: dict


def _train_loop_per_worker(config: dict) -> None:
    """Runs inside the Ray Train worker. Imports Keras 3 itself, never tf.keras."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import ray.train
    import tensorflow as tf

    from train.augment import augment, parse_kinds
    from train.data import load_dataset
    from train.model import compile_for_training, features_name, new_model, save_model_dir

    spec = DataSpec(**{**config["data"], "langs": tuple(config["data"]["langs"])})
    splits = load_dataset(spec)
    splits = dataclasses.replace(splits, train=augment(splits.train, spec.seed, parse_kinds(spec.augment), spec.slots))
    gpus = tf.config.list_physical_devices("GPU")
    # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs: several only with gpus_per_worker > 1
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    start = config.get("init_from")
    labels = splits.labels
    if start:  # fine-tune: the published model's labels and weights, base data + feedback
        from train.data import Example
        from train.store import ModelStore

        with strategy.scope():  # its variables must be created under the strategy (mirrored on each GPU)
            base = ModelStore(start["store"]).load(start["version"])
        labels = base.labels
        feedback = [Example(t, y, "feedback") for t, y in config["feedback"]]
        train = [e for e in splits.train + feedback if e.label in set(labels)]
        splits = type(splits)(train, [e for e in splits.validation if e.label in set(labels)], splits.test, labels)
    index = {label: i for i, label in enumerate(labels)}

    def dataset(examples, shuffle: bool):
        ds = tf.data.Dataset.from_tensor_slices(
            ([e.text for e in examples], [index[e.label] for e in examples])
        )
        if shuffle:
            ds = ds.shuffle(len(examples), seed=spec.seed, reshuffle_each_iteration=True)
        ds = ds.batch(config["batch_size"])
        return (ds.repeat() if config["steps_per_epoch"] else ds).prefetch(2)

    with strategy.scope():
        loaded = base if start else new_model(config["size"], labels, config["arch"], tuple(config["char_ngrams"] or ()))
        compile_for_training(loaded.model, config["learning_rate"])
    device = (f"{len(gpus)} GPU ({', '.join(g.name for g in gpus)}; {type(strategy).__name__})" if gpus
              else "CPU")
    print(f"[train] {config['size']} {loaded.arch} model "
          f"({features_name(loaded.size.char_ngrams, loaded.size.subword_mix)}), "
          f"{loaded.model.count_params():,} parameters, on {device}; "
          f"{len(splits.train)} train / {len(splits.validation)} validation examples")

    class ReportEachEpoch(keras.callbacks.Callback):
        """Ray's ReportCheckpointCallback subclasses tf.keras' Callback, so Keras 3 needs its own."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start, self._seen = time.perf_counter(), 0

        def on_train_batch_end(self, batch, logs=None):
            self._seen += 1

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._start
            samples = min(self._seen * config["batch_size"], len(splits.train)) \
                if not config["steps_per_epoch"] else self._seen * config["batch_size"]
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics.update(epoch=epoch + 1, epoch_seconds=seconds, samples_per_s=samples / seconds,
                           device=device)
            with tempfile.TemporaryDirectory() as tmp:
                loaded.metrics = metrics
                save_model_dir(loaded, tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    loaded.model.fit(
        dataset(splits.train, shuffle=True),
        validation_data=dataset(splits.validation, shuffle=False) if splits.validation else None,
        validation_steps=max(1, len(splits.validation) // config["batch_size"]) if config["steps_per_epoch"] else None,
        epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"],
        callbacks=[ReportEachEpoch()],
        verbose=2,  # one line per epoch: Ray's log forwarding mangles Keras' live bar
    )


def run_training(cfg: TrainConfig) -> TrainOutcome:
    """Train on a (local or connected) Ray cluster and publish the best epoch as a new version."""
    import ray

    from train.store import ModelStore

    store = ModelStore(cfg.store_uri)
    if cfg.fine_tune:
        fine_tune_arch(cfg, store)  # a mismatched --arch fails here, before Ray starts
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init()  # with the dashboard: Train V2's clean-up watcher asks the state API
    try:
        if cfg.use_gpu:
            print(f"[train] {check_gpu_capacity(cfg)}")
        return _fit_and_publish(cfg, store)
    finally:
        if started_ray:
            ray.shutdown()  # a local Ray started here goes with it


class NoGpuError(RuntimeError):
    """--use-gpu on a Ray cluster that has no GPU and cannot start a node with one."""


def _autoscaled_gpus(bootstrap: Path = Path("~/ray_bootstrap_config.yaml").expanduser()) -> float:
    """The most GPUs one node type of a `ray up` cluster's autoscaler can start (0 elsewhere).

    A job driver runs on the head, where `ray up` leaves the autoscaler's config with every node
    type's resources filled in (a GPU node type may have no node running: min_workers 0).
    """
    import yaml

    if not bootstrap.exists():
        return 0
    types = (yaml.safe_load(bootstrap.read_text()) or {}).get("available_node_types") or {}
    return max([float((t.get("resources") or {}).get("GPU", 0)) for t in types.values()] + [0])


def check_gpu_capacity(cfg: TrainConfig) -> str:
    """Where the GPUs come from, or NoGpuError before training starts when there are none."""
    import ray

    per_node = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    wanted = cfg.gpus_per_worker or 1
    if max(per_node + [0]) >= wanted:
        return f"GPUs per node in this Ray cluster: {per_node}; the worker asks for {wanted}"
    scalable = _autoscaled_gpus()
    if scalable >= wanted:
        return f"no node has {wanted} GPU(s) now; the autoscaler can start one with {scalable:g}"
    raise NoGpuError(
        f"--use-gpu: the Ray cluster has no node with {wanted:g} GPU(s) (GPUs per node: {per_node or 'no nodes'}) "
        "and no autoscaler node type with them; train on CPU without --use-gpu, or start a node with a GPU "
        "(docs/TRAINING.md)")


def _fine_tune_inputs(cfg: TrainConfig, store, pin_owner: str) -> tuple[dict, int]:
    """(loop config additions, last log offset) for a fine-tune run."""
    from train.learner_state import judged_offset
    from train.log_reader import FeedbackLogReader, OffsetCompacted

    for _ in range(5):  # pinned so that the learner's retention keeps it while we train from it
        latest = store.latest()
        if latest is None:
            raise FileNotFoundError(f"--fine-tune needs a published model in {store.uri}; train one first")
        store.pin(latest, pin_owner)
        if latest in store.versions():
            break
    else:
        raise RuntimeError(f"the newest version in {store.uri} kept disappearing while being pinned; retry")
    # Read-only: the learner may be appending now; the reader stops before its write in flight.
    reader = FeedbackLogReader(cfg.feedback_dir)
    judged = judged_offset(cfg.feedback_dir)  # later events: the learner judges them after it adopts this
    for attempt in range(3):  # the learner may compact the oldest segment while we read it
        events, excluded, deferred, last = [], 0, 0, -1
        try:
            for e in reader.iter_from(reader.first_offset):
                if judged is not None and e.offset > judged:
                    break
                last = e.offset
                if e.holdout or e.rejected:  # the gate's holdout, or a round the gate judged harmful
                    excluded += 1
                else:  # deferred: held back on the base check alone; the operator's call (a new
                    deferred += e.deferred  # language, or relabels of texts the model was unsure of)
                    if cfg.include_deferred or not e.deferred:
                        events.append(e)
            break
        except OffsetCompacted:
            if attempt == 2:
                raise
    base_offset = store.metrics(latest).get("log_offset", -1)
    if reader.first_offset > base_offset + 1:
        raise RuntimeError(f"v{latest} includes feedback up to offset {base_offset}, but the log in {cfg.feedback_dir} "
                           f"keeps only offsets from {reader.first_offset}: events between were compacted, so a "
                           "fine-tune would lose them. Raise log_retain_events, or fine-tune from a newer snapshot")
    extra = {"init_from": {"store": store.uri, "version": latest}, "feedback": [(e.text, e.label) for e in events],
             "arch": fine_tune_arch(cfg, store, latest)}
    recorded = store.metrics(latest).get("data")
    if recorded:
        from train.data import spec_from_record

        keys = ("langs", "path", "split", "seed", "slots")
        base_spec = spec_from_record(recorded)
        if any(getattr(base_spec, k) != getattr(cfg.data, k) for k in keys):
            print(f"[fine-tune] warning: v{latest} was trained on {({k: getattr(base_spec, k) for k in keys})}, this run "
                  f"uses {({k: getattr(cfg.data, k) for k in keys})}: its test accuracy and the learner's gate follow "
                  "this run's data (pass the base's --langs/--data/--split/--seed/--slots to keep them)")
    print(f"[fine-tune] from v{latest} with {len(events)} feedback events from {cfg.feedback_dir} "
          f"(offsets {reader.first_offset}..{last}; {excluded} excluded: gate holdout or rejected round; {deferred} "
          f"deferred by the learner's base check, {'included' if cfg.include_deferred else 'left out (--include-deferred trains on them)'})"
          + (f"; events after offset {judged}, not judged by the learner yet, are left to it" if judged is not None else
             "; no learner state found, so every event in the log was read"))
    return extra, last


def _fit_and_publish(cfg: TrainConfig, store) -> TrainOutcome:
    """Train (a fine-tune pins its base version in the store meanwhile), evaluate, publish."""
    pin_owner = f"fine-tune-{uuid.uuid4().hex[:12]}"
    try:
        return _fit(cfg, store, pin_owner)
    finally:
        if cfg.fine_tune:
            store.unpin(pin_owner)


def _fit(cfg: TrainConfig, store, pin_owner: str) -> TrainOutcome:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from train.data import load_dataset
    from train.evaluate import CONFUSION_FILE, evaluate
    from train.model import load_model_dir, save_model_dir

    extra, log_offset = _fine_tune_inputs(cfg, store, pin_owner) if cfg.fine_tune else ({}, None)
    loop_config = {
        "size": cfg.size,
        "arch": cfg.arch or DEFAULT_ARCH,
        "char_ngrams": None if cfg.fine_tune else list(cfg.new_char_ngrams),  # a fine-tune keeps its base's
        "data": dataclasses.asdict(cfg.data),
        "epochs": cfg.num_epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "steps_per_epoch": cfg.steps_per_epoch,
        **extra,
    }
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    trainer = TensorflowTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.use_gpu, resources_per_worker={
            "CPU": cfg.cpus_per_worker,
            **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {}),  # > 1: MirroredStrategy
            **cfg.worker_resources}),
        run_config=RunConfig(
            name=f"train-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"
            ),
        ),
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "val_accuracy" in m]
    if not scored:
        raise RuntimeError("training reported no checkpoint with val_accuracy")
    checkpoint, best = max(scored, key=lambda cm: cm[1]["val_accuracy"])

    splits = load_dataset(cfg.data)
    with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory() as out:
        loaded = load_model_dir(ckpt_dir)
        scores, confusion = evaluate(loaded, splits, cfg.data.effective_split)
        loaded.metrics = {
            **best,
            **scores,
            "confusion": {k: confusion[k] for k in ("worst_intents", "most_confused")},
            "parameters": loaded.model.count_params(),
            "size": cfg.size,
            "arch": loaded.arch,
            "char_ngrams": list(loaded.size.char_ngrams),
            "subword_mix": loaded.size.subword_mix if loaded.size.char_ngrams else None,
            "data": dataclasses.asdict(cfg.data),
            "examples": {"train": len(splits.train), "validation": len(splits.validation),
                         "test": len(splits.test), "test_seen": len(splits.test_seen)},
            "train_wall_s": time.time() - started,
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if cfg.fine_tune:  # the online learner rebases on this version and replays after log_offset
            loaded.metrics.update(kind="fine-tune", log_offset=log_offset, fine_tuned_from=extra["init_from"]["version"])
        save_model_dir(loaded, out)
        Path(out, CONFUSION_FILE).write_text(json.dumps(confusion, indent=2), encoding="utf-8")
        version = store.publish(out)  # above every version and every number the learner reserved
    return TrainOutcome(version, store.version_uri(version), loaded.metrics)
