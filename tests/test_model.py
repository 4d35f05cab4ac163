"""The model takes raw strings; a saved version loads back with identical outputs."""

from __future__ import annotations

import numpy as np
import pytest

import json

from train.model import SIZES, accuracy, load_model_dir, new_model, save_model_dir, size_named
from train.store import ModelStore

TEXTS = ["turn on the kitchen light", "거실 조명 켜줘", "", "!!!", "WHAT'S the TIME?", "x " * 100]


ARCHS = ["lstm", "cnn"]
FEATURES = [("lstm", ()), ("cnn", ()), ("lstm", (2, 3, 4)), ("cnn", (3, 4))]  # (family, character n-grams)


@pytest.mark.parametrize("arch, char_ngrams", FEATURES)
def test_raw_strings_in_probabilities_out(arch, char_ngrams):
    m = new_model("small", ["a", "b", "c"], arch, char_ngrams)
    rng = np.random.default_rng(0)
    for var in m.model.weights:  # biases start at 0, which would hide padded positions in a max pool
        if var.path.endswith("bias"):
            var.assign(rng.normal(0, 1, var.shape).astype("float32"))
    probs = m.predict(TEXTS)
    assert probs.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Tokenisation is case- and punctuation-insensitive, inside the model.
    same = m.predict(["what's the time", "WHAT'S the TIME?"])
    np.testing.assert_allclose(same[0], same[1], rtol=1e-6)
    # A text's answer does not depend on its batch: padding to the longest neighbour (masks do not
    # flow through Conv1D), one-token and empty texts included.
    alone = np.concatenate([m.predict([t]) for t in TEXTS])
    np.testing.assert_allclose(probs, alone, atol=1e-6)


@pytest.mark.parametrize("arch, char_ngrams", FEATURES)
def test_save_load_round_trip_identical(tmp_path, arch, char_ngrams):
    m = new_model("small", ["HassTurnOn", "HassTurnOff"], arch, char_ngrams)
    m.metrics = {"test_accuracy": 0.5}
    before = m.predict(TEXTS)
    save_model_dir(m, tmp_path / "v")
    back = load_model_dir(tmp_path / "v")
    assert back.labels == ["HassTurnOn", "HassTurnOff"] and back.size == m.size and back.arch == arch
    assert json.loads((tmp_path / "v" / "config.json").read_text())["arch"] == arch
    assert back.metrics == {"test_accuracy": 0.5}
    np.testing.assert_array_equal(back.predict(TEXTS), before)


def test_a_version_saved_before_the_cnn_family_loads_as_lstm(tmp_path):
    m = new_model("small", ["a", "b"])
    save_model_dir(m, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    del config["arch"]  # the config.json of every version published before the CNN family
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    back = load_model_dir(tmp_path / "v")
    assert back.arch == "lstm" and back.size == m.size
    np.testing.assert_array_equal(back.predict(TEXTS), m.predict(TEXTS))


def test_versions_saved_now_are_read_or_refused_clearly_by_older_code(tmp_path):
    """An LSTM is saved exactly as before the CNN family (format 1, the four size fields older
    code's ModelSize takes); a CNN says format 2, which older code refuses by name."""
    save_model_dir(new_model("small", ["a", "b"], "lstm"), tmp_path / "lstm")
    save_model_dir(new_model("small", ["a", "b"], "cnn"), tmp_path / "cnn")
    lstm = json.loads((tmp_path / "lstm" / "config.json").read_text())
    cnn = json.loads((tmp_path / "cnn" / "config.json").read_text())
    assert lstm["format"] == 1 and set(lstm["size"]) == {"num_buckets", "embed_dim", "lstm_units", "max_tokens"}
    assert cnn["format"] == 2 and cnn["size"]["conv_widths"] == [3, 4, 5]
    cnn["format"] = 5
    (tmp_path / "cnn" / "config.json").write_text(json.dumps(cnn))
    with pytest.raises(ValueError, match=r"model format 5, this code reads \[1, 2, 3, 4\]"):
        load_model_dir(tmp_path / "cnn")


def test_subword_features_share_rows_across_spellings_and_stay_bounded(tmp_path):
    """Character n-grams give "조명을" and "조명 을" (particle attached or not) common rows, a word
    and an n-gram of the same letters different rows, and a 3,000-letter token no more columns
    than a 20-letter one. A subword version says format 4, which code from before refuses."""
    m = new_model("small", ["a", "b"], "lstm", (2, 3))
    tokens = m.model.get_layer("tokens")
    ids = lambda text: set(tokens(np.array([text])).numpy().ravel().tolist()) - {0}  # noqa: E731
    assert ids("조명을") & ids("조명 을")
    word_on = tokens(np.array(["on"])).numpy()[0, 0, 0]
    assert word_on not in tokens(np.array(["lemon"])).numpy()[0, 0, 1:]
    assert tokens(np.array(["x" * 3000])).shape == tokens(np.array(["x" * 20])).shape
    a, b = tokens(np.array(["internationalization" + "abc", "internationalization" + "xyz"])).numpy()
    assert a[0, 0] != b[0, 0]  # n-grams come from the first 20 letters, the word id from all of them
    words_only = new_model("small", ["a", "b"], "lstm")
    assert not ids("조명을") & set(words_only.model.get_layer("tokens")(np.array(["조명 을"])).numpy().ravel().tolist())
    save_model_dir(m, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["format"] == 4 and config["size"]["char_ngrams"] == [2, 3]
    assert config["size"]["subword_mix"] == "word+grams"


@pytest.mark.parametrize("mix", ["word+grams", "mean"])
def test_a_tokens_vector_is_its_word_row_plus_its_grams_or_the_mean_of_all(tmp_path, mix):
    """What the embedding step computes, row by row, for each mix; and a subword version saved
    before the mix existed (format 3, no field) loads as the mean, with identical answers."""
    import keras

    m = new_model("small", ["a", "b"], "cnn", (2, 3), subword_mix=mix)
    ids = m.model.get_layer("tokens")(np.array(["lamp on", "x"])).numpy()
    rows = m.model.get_layer("embedding").embeddings.numpy()
    pooled_in = keras.Model(m.model.input, m.model.get_layer("conv3").input)(np.array(["lamp on", "x"])).numpy()
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            present = [i for i in ids[b, t] if i]
            if not present:
                continue
            word, grams = rows[ids[b, t, 0]], rows[[i for i in ids[b, t, 1:] if i]]
            want = word + grams.mean(axis=0) if mix == "word+grams" else rows[present].mean(axis=0)
            np.testing.assert_allclose(pooled_in[b, t], want, rtol=1e-5, atol=1e-6)
    save_model_dir(m, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["format"] == (4 if mix == "word+grams" else 3)
    assert ("subword_mix" in config["size"]) == (mix == "word+grams")  # format 3 is written as before
    back = load_model_dir(tmp_path / "v")
    assert back.size.subword_mix == mix
    np.testing.assert_array_equal(back.predict(TEXTS), m.predict(TEXTS))


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match=r"unknown model family 'rnn'; choose one of \['lstm', 'cnn'\]"):
        new_model("small", ["a"], "rnn")


@pytest.mark.parametrize("size, arch", [("small", "lstm"), ("small", "cnn"), ("large", "cnn")])
def test_parameter_count_matches_the_built_model(size, arch):
    assert new_model(size, ["a"] * 34, arch).model.count_params() == SIZES[size].params(34, arch)


def test_store_versions_are_numbered_and_loadable(tmp_path):
    store = ModelStore(str(tmp_path / "store"))
    assert store.latest() is None
    with pytest.raises(FileNotFoundError, match="train one first"):
        store.load()
    m = new_model("small", ["a", "b"])
    save_model_dir(m, tmp_path / "saved")
    assert store.publish(tmp_path / "saved") == 1
    assert store.publish(tmp_path / "saved") == 2
    assert store.versions() == [1, 2]
    loaded = store.load()
    assert loaded.version == 2
    np.testing.assert_array_equal(loaded.predict(TEXTS), m.predict(TEXTS))
    with pytest.raises(FileNotFoundError, match="model version 7 not in"):
        store.load(7)


def test_unknown_size_rejected():
    with pytest.raises(ValueError, match=r"unknown model size 'huge'; choose one of \['large', 'small'\]"):
        size_named("huge")


def test_large_size_is_the_production_shape():
    large = SIZES["large"]
    assert large.embed_dim == 300
    assert 78e6 <= large.params(num_labels=34) <= 82e6  # their model: 80,656,435
    assert 78e6 <= large.params(num_labels=34, arch="cnn") <= 82e6


def test_accuracy_counts_unknown_labels_wrong():
    m = new_model("small", ["a", "b"])
    assert accuracy(m, ["x", "y"], ["zzz", "zzz"]) == 0.0


def test_a_subword_config_whose_format_and_mix_disagree_is_refused(tmp_path):
    """Format 3 means the mean of rows, format 4 the word row plus the n-grams' mean: a config
    that says one with the other's mix (hand-edited or damaged) is refused, never loaded as a guess."""
    save_model_dir(new_model("small", ["a", "b"], "cnn", (2, 3)), tmp_path / "v")
    path = tmp_path / "v" / "config.json"
    config = json.loads(path.read_text())
    for fmt, mix in ((4, None), (3, "word+grams"), (4, "mean"), (4, "sum")):
        size = {k: v for k, v in config["size"].items() if k != "subword_mix"}
        path.write_text(json.dumps({**config, "format": fmt, "size": size if mix is None else {**size, "subword_mix": mix}}))
        with pytest.raises(ValueError, match="do not go together"):
            load_model_dir(tmp_path / "v")
