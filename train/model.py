"""The text classifier: raw strings in, class probabilities out.

Tokenisation lives inside the model (lower-case, strip punctuation, split on whitespace, hash
each token into a bucket), so training, serving and online learning can never tokenise
differently, and a word never seen before still gets an embedding row of its own to learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402  (Keras 3; never tf.keras: Ray Train sets TF_USE_LEGACY_KERAS=1)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.weights.h5"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class ModelSize:
    num_buckets: int  # hashed vocabulary; bucket 0 is padding
    embed_dim: int
    lstm_units: int
    max_tokens: int  # longer texts are cut: chatbot queries are short

    def params(self, num_labels: int) -> int:
        lstm = 4 * ((self.embed_dim + self.lstm_units) * self.lstm_units + self.lstm_units)
        dense = (self.lstm_units + 1) * num_labels
        return self.num_buckets * self.embed_dim + lstm + dense


SIZES = {
    "small": ModelSize(num_buckets=2**15, embed_dim=48, lstm_units=48, max_tokens=32),
    # The production model: 300-d embedding, ~80M parameters, nearly all in the embedding.
    "large": ModelSize(num_buckets=265_000, embed_dim=300, lstm_units=256, max_tokens=32),
}


def size_named(name: str) -> ModelSize:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


@keras.saving.register_keras_serializable(package="textserve")
class HashedTokens(keras.layers.Layer):
    """Strings -> padded token ids in [1, num_buckets); 0 pads. Stateless, so no vocabulary."""

    def __init__(self, num_buckets: int, max_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.num_buckets = num_buckets
        self.max_tokens = max_tokens

    def call(self, texts):
        texts = tf.strings.lower(tf.reshape(texts, [-1]), encoding="utf-8")
        texts = tf.strings.regex_replace(texts, r"[^\p{L}\p{N}\s]", " ")
        tokens = tf.strings.split(texts)[:, : self.max_tokens]
        ids = tf.strings.to_hash_bucket_fast(tokens, self.num_buckets - 1) + 1
        dense = ids.to_tensor(default_value=0)
        # An all-empty batch has zero columns; the LSTM needs at least one step.
        return tf.pad(dense, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(dense)[1])]])

    def compute_output_spec(self, texts):
        return keras.KerasTensor((texts.shape[0], None), dtype="int64")

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets, "max_tokens": self.max_tokens}


def build_model(size: ModelSize, labels: list[str]) -> keras.Model:
    texts = keras.Input(shape=(), dtype="string", name="text")
    ids = HashedTokens(size.num_buckets, size.max_tokens, name="tokens")(texts)
    x = keras.layers.Embedding(size.num_buckets, size.embed_dim, mask_zero=True, name="embedding")(ids)
    x = keras.layers.LSTM(size.lstm_units, name="lstm")(x)
    probs = keras.layers.Dense(len(labels), activation="softmax", name="classes")(x)
    return keras.Model(texts, probs, name="text_classifier")


def compile_for_training(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@dataclass
class LoadedModel:
    model: keras.Model
    labels: list[str]
    size_name: str
    size: ModelSize
    metrics: dict
    version: int | None = None  # set when it came from a model store

    def predict_fn(self):
        """A compiled function texts -> probabilities; ~20x cheaper per call than model.predict."""
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)
        def _predict(texts):
            return model(texts, training=False)

        return _predict

    def predict(self, texts: list[str]) -> np.ndarray:
        return self.predict_fn()(tf.constant(texts, dtype=tf.string)).numpy()


def save_model_dir(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write weights, labels, size and metrics into a folder (one model-store version)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    loaded.model.save_weights(str(directory / WEIGHTS_FILE))
    config = {
        "format": FORMAT_VERSION,
        "size_name": loaded.size_name,
        "size": asdict(loaded.size),
        "labels": list(loaded.labels),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    write_metrics(directory, loaded.metrics)
    return directory


def write_metrics(directory: str | Path, metrics: dict) -> None:
    Path(directory, METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def load_model_dir(directory: str | Path) -> LoadedModel:
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved model: it has no {CONFIG_FILE}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}: model format {config.get('format')}, this code reads {FORMAT_VERSION}")
    size = ModelSize(**config["size"])
    model = build_model(size, config["labels"])
    model.load_weights(str(directory / WEIGHTS_FILE))
    metrics_path = directory / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    return LoadedModel(model, list(config["labels"]), config["size_name"], size, metrics)


def new_model(size_name: str, labels: list[str]) -> LoadedModel:
    size = size_named(size_name)
    return LoadedModel(build_model(size, labels), list(labels), size_name, size, {})


def accuracy(loaded: LoadedModel, texts: list[str], labels: list[str], batch_size: int = 256) -> float:
    """Share of texts whose top class is the given label (labels the model does not know count wrong)."""
    if not texts:
        return float("nan")
    fn = loaded.predict_fn()
    index = {label: i for i, label in enumerate(loaded.labels)}
    correct = 0
    for start in range(0, len(texts), batch_size):
        probs = fn(tf.constant(texts[start : start + batch_size])).numpy()
        top = probs.argmax(axis=1)
        correct += sum(int(t == index.get(y, -1)) for t, y in zip(top, labels[start : start + batch_size]))
    return correct / len(texts)
