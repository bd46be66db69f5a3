"""examples/run_classification_search.py end to end on a CSV of its own, with a tiny BERT saved to disk."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from conftest import TINY_MODELS
from peft import PeftModel
from transformers import BertTokenizerFast

import peft_s3

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_classification_search.py"
WORDS = {"positive": ["good", "great", "fine", "nice"], "negative": ["bad", "poor", "awful", "sad"]}
NEUTRAL = ["the", "film", "plot", "was", "and", "cast"]


def write_csv(path: Path, rows: int, seed: int) -> None:
    """Two text columns and a string label: the label's words are spread over title and body."""
    generator = random.Random(seed)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["title", "body", "sentiment"])
        for row in range(rows):
            label = "positive" if row % 2 else "negative"
            words = [generator.choice(WORDS[label] + NEUTRAL) for _ in range(8)]
            writer.writerow([" ".join(words[:3]), " ".join(words[3:]), label])


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> Path:
    """A tiny BERT and a word-level tokenizer of the CSV's words, saved as a from_pretrained directory."""
    directory = tmp_path / "tiny-bert"
    directory.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *NEUTRAL, *WORDS["positive"], *WORDS["negative"]]
    # `vocab=`, not `vocab_file=`: transformers 5 ignores the file and leaves a tokenizer that knows only [UNK].
    BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}).save_pretrained(directory)
    TINY_MODELS["bert"]().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    """The script as a module, run in-process: its `main(argv)` is what `python run_classification_search.py` runs."""
    spec = importlib.util.spec_from_file_location("run_classification_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses (and HfArgumentParser) resolve their annotations through sys.modules.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_searches_retrains_and_writes_every_output_from_a_csv(
    script: ModuleType, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    write_csv(tmp_path / "train.csv", 48, seed=0)
    write_csv(tmp_path / "test.csv", 16, seed=1)
    output = tmp_path / "out"
    script.main(
        [
            *("--model_name_or_path", str(tiny_bert_dir), "--train_file", str(tmp_path / "train.csv")),
            *("--test_file", str(tmp_path / "test.csv"), "--text_column_names", "title,body"),
            *("--label_column_name", "sentiment", "--max_seq_length", "16", "--budget", "100"),
            *("--output_dir", str(output), "--per_device_train_batch_size", "8", "--max_steps", "3"),
            *("--retrain_max_steps", "2", "--learning_rate", "0.01", "--bilevel", "first_order"),
            *("--annealing", '{"budget_from": 2.0, "fraction": 0.5}', "--save_strategy", "no", "--report_to", "none"),
        ]
    )

    results = json.loads((output / "results.json").read_text())
    # 48 training rows: 10 % held out as validation, since no validation file was given.
    assert results["rows"] == {"train": 43, "validation": 5, "test": 16}
    assert results["labels"] == ["negative", "positive"]
    assert results["search_steps"] == 3
    assert results["search_options"]["bilevel"] == "first_order"
    assert results["search_options"]["annealing"] == {
        "budget_from": 2.0,
        "tau_from": None,
        "beta_from": None,
        "fraction": 0.5,
    }
    assert 0 < results["structure_params"] <= results["budget"] == 100
    assert results["trainable_params_without_head"] == results["structure_params"]
    assert 0.0 <= results["decided_mass"] <= 1.0
    for name in ("validation_accuracy", "validation_macro_f1", "test_accuracy", "test_macro_f1"):
        assert 0.0 <= results[name] <= 1.0, name

    structure = peft_s3.SearchedStructure.load(output)
    assert structure.num_trainable_params == results["structure_params"]
    for name in ("gates_p.png", "structure.png"):
        assert (output / name).read_bytes().startswith(b"\x89PNG"), name
    adapter = output / "adapter"
    assert peft_s3.SearchedStructure.load(adapter).structure == structure.structure
    assert "S3 searched structure" in (adapter / "README.md").read_text()
    # Retraining started from the search's weights, the default when apply_structure is given the search model.
    assert json.loads((adapter / "adapter_config.json").read_text())["retrain_init"] == "inherit"
    # The retrained adapter loads onto a fresh base with exactly the structure's trainable parameters (plus the head).
    model = PeftModel.from_pretrained(TINY_MODELS["bert"](), adapter, is_trainable=True)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    assert trainable == structure.num_trainable_params


def test_reads_a_yaml_config_file_and_refuses_bad_options(
    script: ModuleType, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    write_csv(tmp_path / "train.csv", 24, seed=0)
    config = {
        "model_name_or_path": str(tiny_bert_dir),
        "train_file": str(tmp_path / "train.csv"),
        "text_column_names": "title",
        "label_column_name": "sentiment",
        "budget": 100,
        "output_dir": str(tmp_path / "out"),
        "bilevel": "first_order",
        "alpha_warmup_steps": 3,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    model_args, data_args, args = script.parse_arguments([str(tmp_path / "config.yaml")])
    assert (model_args.budget, data_args.text_columns(), args.bilevel, args.alpha_warmup_steps) == (
        100,
        ["title"],
        "first_order",
        3,
    )
    # A bad search option in the file is refused by S3SearchArguments, before anything runs.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "alpha_learning_rate": -1.0}))
    with pytest.raises(ValueError, match=r"alpha_learning_rate=-1.0 is not allowed: it must be a finite float > 0\."):
        script.main([str(tmp_path / "config.yaml")])
    assert not (tmp_path / "out").exists()

    common = ["--model_name_or_path", str(tiny_bert_dir), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"use files of one format, \.csv, \.json, \.jsonl, \.parquet"):
        script.main([*common, "--train_file", str(tmp_path / "train.txt")])
    with pytest.raises(FileNotFoundError, match="missing.csv not found"):
        script.main([*common, "--train_file", str(tmp_path / "missing.csv")])
    with pytest.raises(ValueError, match=r"no text column\(s\) \['text'\]; its columns are \['title', 'body'"):
        script.main([*common, "--train_file", str(tmp_path / "train.csv")])
    with pytest.raises(ValueError, match="neither a from_pretrained directory nor a shipped model"):
        script.main(["--model_name_or_path", "no-such-model", "--train_file", str(tmp_path / "train.csv")])


@pytest.mark.parametrize("form", ["csv", "json", "jsonl", "parquet", "save_to_disk"])
def test_reads_every_data_form_with_the_same_labels(
    script: ModuleType, tiny_bert_dir: Path, tmp_path: Path, form: str
) -> None:
    """The same rows as files of every format, or a DatasetDict saved to disk with a ClassLabel, give one task."""
    import datasets

    write_csv(tmp_path / "rows.csv", 20, seed=0)
    rows = datasets.load_dataset("csv", data_files=str(tmp_path / "rows.csv"))["train"]
    parts = {
        "train": rows.select(range(12)),
        "validation": rows.select(range(12, 16)),
        "test": rows.select(range(16, 20)),
    }
    if form == "save_to_disk":
        labelled = datasets.DatasetDict(parts).class_encode_column("sentiment")
        labelled.save_to_disk(tmp_path / "saved")
        data = ["--dataset_name", str(tmp_path / "saved")]
    else:
        data = []
        for split, part in parts.items():
            path = tmp_path / f"{split}.{form}"
            {"csv": part.to_csv, "parquet": part.to_parquet}.get(form, part.to_json)(str(path))
            data += [f"--{split}_file", str(path)]
    model_args, data_args, _ = script.parse_arguments(
        [
            *("--model_name_or_path", str(tiny_bert_dir), *data, "--output_dir", str(tmp_path / "out")),
            *("--text_column_names", "title,body", "--label_column_name", "sentiment"),
        ]
    )
    task, sizes = script.tokenized_task(model_args, data_args, seed=0)
    assert sizes == {"train": 12, "validation": 4, "test": 4}
    assert task.label_names == ["negative", "positive"]
    # Row i of the CSV is positive when i is odd; its tokens are the title's then the body's words.
    assert task.splits["test"]["labels"] == [0, 1, 0, 1]
    first = rows[16]
    words = task.tokenizer.convert_ids_to_tokens(task.splits["test"][0]["input_ids"])[1:-1]
    assert words == f"{first['title']} {first['body']}".split()[: len(words)]
