"""The example scripts end to end, on tiny models saved to disk instead of MiniLM and SmolLM2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *arguments: str) -> None:
    """Runs examples/`script` offline with `arguments`; fails with the end of its stderr."""
    command = [sys.executable, str(ROOT / "examples" / script), *arguments]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_search_and_retrain_script_writes_structure_plots_and_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    run_example(
        "search_and_retrain.py",
        *("--model", str(tiny_model_dir), "--dataset", "amazon_food", "--budget", "100"),
        *("--max-train", "48", "--max-eval", "16", "--max-length", "16", "--batch-size", "8"),
        *("--search-epochs", "1", "--retrain-epochs", "1", "--output-dir", str(output)),
    )
    results = json.loads((output / "results.json").read_text())
    assert 0 < results["structure_params"] <= results["budget"] == 100
    assert results["trainable_params_without_head"] == results["structure_params"]
    assert 0.0 <= results["test_accuracy"] <= 1.0
    for name in ("s3_structure.json", "gates_p.png", "structure.png", "retrained/adapter_config.json"):
        assert (output / name).is_file(), name
    assert "S3 searched structure" in (output / "retrained" / "README.md").read_text()


def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama with a word-level tokenizer, saved to disk instead of SmolLM2."""
    import tokenizers
    from conftest import TINY_MODELS
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "tiny-llama"
    TINY_MODELS["llama"]().save_pretrained(model_dir)
    # Every word is [UNK] but the few common ones: enough text structure for two optimizer steps.
    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "the", "a", "of", "to"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(model_dir)
    return model_dir


def run_search_sft(tmp_path: Path, *arguments: str) -> tuple[dict, dict]:
    """examples/search_sft.py on a tiny Llama; its results.json and the retrained adapter's config."""
    pytest.importorskip("trl")
    output = tmp_path / "out"
    run_example(
        "search_sft.py",
        *("--model", str(tiny_llama_dir(tmp_path)), "--budget", "300", "--steps", "2", "--max-length", "24"),
        *("--train-articles", "16", "--eval-articles", "8", "--output-dir", str(output), *arguments),
    )
    results = json.loads((output / "results.json").read_text())
    assert 0 < results["structure_params"] <= results["budget"] == 300
    assert results["held_out_completion_perplexity_retrained"] > 1.0
    return results, json.loads((output / "retrained" / "adapter_config.json").read_text())


def test_search_sft_script_searches_and_retrains_a_plain_lora(tmp_path: Path) -> None:
    results, config = run_search_sft(tmp_path)
    # The LoRA-space structure retrains as a plain peft LoraConfig with exactly its parameter count.
    assert results["retrained_trainable_params"] == results["structure_params"]
    assert config["peft_type"] == "LORA"


def test_search_sft_script_retrains_a_mix_structure_from_the_search_weights(tmp_path: Path) -> None:
    results, config = run_search_sft(tmp_path, "--space", "mix")
    assert results["retrained_trainable_params"] == results["structure_params"]
    assert config["peft_type"] == "S3" and config["retrain_init"] == "inherit"
