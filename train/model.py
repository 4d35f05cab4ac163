"""The text classifier: raw strings in, class probabilities out.

Tokenisation lives inside the model (lower-case, strip punctuation, split on whitespace, hash
each token into a bucket), so training, serving and online learning can never tokenise
differently, and a word never seen before still gets an embedding row of its own to learn.

Two families share that front end and the layer names "tokens" and "embedding" (online learning
updates the embedding sparsely and publishes its touched rows): `lstm` (embedding -> LSTM ->
softmax) and `cnn` (embedding -> parallel Conv1D of widths 3/4/5 -> global max pool -> dropout ->
softmax: the seed study's "simple word CNN").
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402  (Keras 3; never tf.keras: Ray Train sets TF_USE_LEGACY_KERAS=1)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FORMAT_VERSION = 1  # an LSTM: readable by code from before the CNN family
CNN_FORMAT_VERSION = 2  # a CNN: code from before the CNN family refuses it with a clear error
SUBWORD_FORMAT_VERSION = 3  # character n-grams: older code would tokenise it by words alone, so it refuses it
WORD_PLUS_GRAMS_FORMAT_VERSION = 4  # n-grams added to the word row: older code would average them, so it refuses it
READABLE_FORMATS = (FORMAT_VERSION, CNN_FORMAT_VERSION, SUBWORD_FORMAT_VERSION, WORD_PLUS_GRAMS_FORMAT_VERSION)
# How a token's vector is made from its rows when it has character n-grams: "word+grams" (its word
# row plus the mean of its n-gram rows: what new models use, docs/QUALITY.md) or "mean" (the mean of
# all its rows, word row included: models saved before, format 3).
SUBWORD_MIXES = ("word+grams", "mean")
ARCHS = ("lstm", "cnn")  # model families; a config.json without "arch" (older versions) is lstm
WEIGHTS_FILE = "model.weights.h5"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class ModelSize:
    num_buckets: int  # hashed vocabulary; bucket 0 is padding
    embed_dim: int
    lstm_units: int
    max_tokens: int  # longer texts are cut: chatbot queries are short
    conv_filters: int = 64  # cnn: filters per width
    conv_widths: tuple[int, ...] = (3, 4, 5)  # cnn: one Conv1D per width, in parallel
    # Subword features: a token's vector is made from its word row and the rows of its character
    # n-grams of these widths (hashed into the same buckets) as `subword_mix` says; () is words
    # alone. Only the first max_token_chars characters of a token are split into n-grams (its word
    # id hashes all of it), so one long token cannot make a batch huge.
    char_ngrams: tuple[int, ...] = ()
    max_token_chars: int = 20
    subword_mix: str = "mean"  # what a saved config without the field means; new_model gives "word+grams"

    def params(self, num_labels: int, arch: str = "lstm") -> int:
        """Parameters of the model this size builds for `arch` (what Keras' count_params says)."""
        embedding = self.num_buckets * self.embed_dim
        if arch == "cnn":
            convs = sum(w * self.embed_dim * self.conv_filters + self.conv_filters for w in self.conv_widths)
            return embedding + convs + (self.conv_filters * len(self.conv_widths) + 1) * num_labels
        lstm = 4 * ((self.embed_dim + self.lstm_units) * self.lstm_units + self.lstm_units)
        dense = (self.lstm_units + 1) * num_labels
        return embedding + lstm + dense


SIZES = {
    "small": ModelSize(num_buckets=2**15, embed_dim=48, lstm_units=48, max_tokens=32, conv_filters=64),
    # The production model: 300-d embedding, ~80M parameters, nearly all in the embedding.
    "large": ModelSize(num_buckets=265_000, embed_dim=300, lstm_units=256, max_tokens=32, conv_filters=256),
}
CNN_DROPOUT = 0.5  # before the softmax, as in Kim (2014)'s sentence CNN


def arch_named(name: str) -> str:
    if name not in ARCHS:
        raise ValueError(f"unknown model family {name!r}; choose one of {list(ARCHS)}")
    return name


def check_char_ngrams(widths) -> tuple[int, ...]:
    """Character n-gram widths as a model takes them: distinct, increasing, 1 to 8."""
    widths = tuple(widths)
    if any(not 1 <= n <= 8 for n in widths) or list(widths) != sorted(set(widths)):
        raise ValueError(f"char_ngrams widths must be distinct, increasing and between 1 and 8, got {list(widths)}")
    return widths


def features_name(widths, mix: str = "word+grams") -> str:
    """What a model's tokens are made of, for people: "words", "words + char 2/3/4-grams" or, for
    models that average the word row with its n-grams, "mean of words and char 2/3/4-grams"."""
    if not widths:
        return "words"
    grams = f"char {'/'.join(map(str, widths))}-grams"
    return f"words + {grams}" if mix == "word+grams" else f"mean of words and {grams}"


def size_named(name: str) -> ModelSize:
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


@keras.saving.register_keras_serializable(package="textserve")
class HashedTokens(keras.layers.Layer):
    """Strings -> padded token ids in [1, num_buckets); 0 pads. Stateless, so no vocabulary.

    Words alone: ids of shape (batch, tokens). With `char_ngrams`: (batch, tokens, 1 + n-grams),
    each token's word id first, then the ids of its character n-grams ("lamp" -> "<la", "lam",
    "amp", "mp>" for width 3; "조명을" shares "<조명" with "조명 을"). N-grams are hashed with a
    "#" prefix, so the n-gram "on" and the word "on" are different rows."""

    def __init__(self, num_buckets: int, max_tokens: int, char_ngrams: tuple[int, ...] = (),
                 max_token_chars: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.num_buckets = num_buckets
        self.max_tokens = max_tokens
        self.char_ngrams = tuple(char_ngrams)
        self.max_token_chars = max_token_chars

    def call(self, texts):
        texts = tf.strings.lower(tf.reshape(texts, [-1]), encoding="utf-8")
        texts = tf.strings.regex_replace(texts, r"[^\p{L}\p{N}\s]", " ")
        tokens = tf.strings.split(texts)[:, : self.max_tokens]
        if self.char_ngrams:  # the word id from the whole token, n-grams from its first characters
            chars = tf.strings.unicode_split(tf.strings.substr(tokens, 0, self.max_token_chars, unit="UTF8_CHAR"), "UTF-8")
            grams = tf.strings.ngrams(chars, list(self.char_ngrams), separator="", pad_values=("<", ">"),
                                      padding_width=1)
            grams = tf.ragged.map_flat_values(lambda g: tf.constant("#") + g, grams)
            tokens = tf.concat([tf.expand_dims(tokens, -1), grams], axis=-1)
        ids = tf.strings.to_hash_bucket_fast(tokens, self.num_buckets - 1) + 1
        dense = ids.to_tensor(default_value=0)
        # An all-empty batch has zero columns; the LSTM needs at least one step (and a word id).
        return tf.pad(dense, [[0, 0]] + [[0, tf.maximum(0, 1 - tf.shape(dense)[d])] for d in range(1, dense.shape.rank)])

    def compute_output_spec(self, texts):
        shape = (texts.shape[0], None, None) if self.char_ngrams else (texts.shape[0], None)
        return keras.KerasTensor(shape, dtype="int64")

    def get_config(self):
        return {**super().get_config(), "num_buckets": self.num_buckets, "max_tokens": self.max_tokens,
                "char_ngrams": list(self.char_ngrams), "max_token_chars": self.max_token_chars}


def build_model(size: ModelSize, labels: list[str], arch: str = "lstm") -> keras.Model:
    texts = keras.Input(shape=(), dtype="string", name="text")
    ids = HashedTokens(size.num_buckets, size.max_tokens, size.char_ngrams, size.max_token_chars,
                       name="tokens")(texts)
    if arch_named(arch) == "lstm" and not size.char_ngrams:
        x = keras.layers.Embedding(size.num_buckets, size.embed_dim, mask_zero=True, name="embedding")(ids)
        x = keras.layers.LSTM(size.lstm_units, name="lstm")(x)
    elif arch == "lstm":
        x, words = _subword_embedding(size, ids)
        x = keras.layers.LSTM(size.lstm_units, name="lstm")(x, mask=keras.ops.not_equal(words, 0))
    else:
        x = _conv_features(size, ids)
    probs = keras.layers.Dense(len(labels), activation="softmax", name="classes")(x)
    return keras.Model(texts, probs, name="text_classifier")


def _conv_features(size: ModelSize, ids):
    """Parallel Conv1D widths -> global max pool over the text's own positions -> dropout.

    Masks do not flow through Conv1D, so padding is handled here, and a text's answer never
    depends on how long its batch neighbours are: padded positions' embeddings are zeroed (the
    same zeros "same" padding adds at the edges), and only positions inside the text are pooled
    (ReLU outputs are >= 0, so zeroing the rest cannot raise the max). A text of one token (or
    none: empty after stripping, one all-padding column) still gets one position per width.
    """
    if size.char_ngrams:
        x, ids = _subword_embedding(size, ids)
    else:
        x = keras.layers.Embedding(size.num_buckets, size.embed_dim, name="embedding")(ids)
    inside = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(ids, 0), x.dtype), -1)
    x = x * inside
    pooled = []
    for width in size.conv_widths:
        c = keras.layers.Conv1D(size.conv_filters, width, padding="same", activation="relu", name=f"conv{width}")(x)
        pooled.append(keras.layers.GlobalMaxPooling1D(name=f"pool{width}")(c * inside))
    x = keras.layers.Concatenate(name="features")(pooled) if len(pooled) > 1 else pooled[0]
    return keras.layers.Dropout(CNN_DROPOUT, name="dropout")(x)


def _subword_embedding(size: ModelSize, ids):
    """(batch, tokens, 1 + n-grams) ids -> each token's vector, and the word ids (0: padding).

    "word+grams": the word row plus the mean of the n-gram rows, so a known word keeps its full
    weight and a misspelt or unseen one still gets the vector of its pieces; "mean": the mean of
    all the token's rows (the word row one of ~15 for a 6-letter word with 2/3/4-grams)."""
    rows = keras.layers.Embedding(size.num_buckets, size.embed_dim, name="embedding")(ids)
    present = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(ids, 0), rows.dtype), -1)
    rows = rows * present
    if size.subword_mix == "mean":
        x = keras.ops.sum(rows, axis=2) / keras.ops.maximum(keras.ops.sum(present, axis=2), 1.0)
    else:
        grams = keras.ops.sum(rows[:, :, 1:], axis=2) / keras.ops.maximum(keras.ops.sum(present[:, :, 1:], axis=2), 1.0)
        x = rows[:, :, 0] + grams
    return x, ids[:, :, 0]


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
    arch: str = "lstm"  # model family: lstm or cnn
    _predict: Any = field(default=None, repr=False, compare=False)

    def predict_fn(self):
        """A compiled function texts -> probabilities, far cheaper per call than model.predict
        (docs/SERVING.md). Built once per model: a new tf.function traces again, which would cost
        every learner round's gate a trace."""
        if self._predict is None:
            self._predict = self._compile()
        return self._predict

    def _compile(self):
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
    size = asdict(loaded.size)
    if not loaded.size.char_ngrams:  # words alone: the fields code from before subwords reads
        size = {k: v for k, v in size.items() if k not in ("char_ngrams", "max_token_chars", "subword_mix")}
    elif loaded.size.subword_mix == "mean":  # as format 3 wrote it
        size.pop("subword_mix")
    if loaded.arch == "lstm":  # exactly what older code reads (ModelSize(**size) with its 4 fields)
        size = {k: v for k, v in size.items() if not k.startswith("conv_")}
    fmt = CNN_FORMAT_VERSION if loaded.arch == "cnn" else FORMAT_VERSION
    if loaded.size.char_ngrams:
        fmt = SUBWORD_FORMAT_VERSION if loaded.size.subword_mix == "mean" else WORD_PLUS_GRAMS_FORMAT_VERSION
    config = {
        "format": fmt,
        "size_name": loaded.size_name,
        "arch": loaded.arch,
        "size": size,
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
    if config.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{directory}: model format {config.get('format')}, this code reads {list(READABLE_FORMATS)}")
    size = ModelSize(**{k: tuple(v) if k in ("conv_widths", "char_ngrams") else v for k, v in config["size"].items()})
    if size.char_ngrams:  # the format says how rows mix; a config that says otherwise is damaged
        expected = "mean" if config["format"] == SUBWORD_FORMAT_VERSION else "word+grams"
        if config["format"] not in (SUBWORD_FORMAT_VERSION, WORD_PLUS_GRAMS_FORMAT_VERSION) or size.subword_mix != expected:
            raise ValueError(f"{directory}: format {config['format']} with char_ngrams {list(size.char_ngrams)} and "
                             f"subword_mix {size.subword_mix!r} do not go together (format 3 is 'mean', 4 'word+grams')")
    arch = config.get("arch", "lstm")  # versions saved before the CNN family are LSTMs
    model = build_model(size, config["labels"], arch)
    model.load_weights(str(directory / WEIGHTS_FILE))
    metrics_path = directory / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    return LoadedModel(model, list(config["labels"]), config["size_name"], size, metrics, arch=arch)


def model_signature(loaded: LoadedModel) -> str:
    """What besides the weights decides a model's answers: family, size with its features
    (n-gram widths, how rows mix) and labels. Two models with equal weight shapes may differ here
    (a words CNN and a char 2/3-gram CNN), so weights may only move between equal signatures."""
    return json.dumps({"arch": loaded.arch, "size": asdict(loaded.size), "labels": list(loaded.labels)},
                      sort_keys=True, ensure_ascii=False)


def saved_arch(directory: str | Path) -> str:
    """The model family a saved version (its folder) holds, without building it."""
    config = json.loads(Path(directory, CONFIG_FILE).read_text(encoding="utf-8"))
    return config.get("arch", "lstm")


def new_model(size_name: str, labels: list[str], arch: str = "lstm", char_ngrams: tuple[int, ...] = (),
              subword_mix: str = "word+grams") -> LoadedModel:
    if subword_mix not in SUBWORD_MIXES:
        raise ValueError(f"unknown subword_mix {subword_mix!r}; choose one of {list(SUBWORD_MIXES)}")
    size = dataclasses.replace(size_named(size_name), char_ngrams=tuple(char_ngrams),
                               subword_mix=subword_mix if char_ngrams else "mean")
    return LoadedModel(build_model(size, labels, arch), list(labels), size_name, size, {}, arch=arch)


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
