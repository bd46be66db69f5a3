"""The text-classification recipe shared by the example script and the benchmarks: data, search, retrain, evaluate.

Every method that is compared (S3 search + retrain, manual PEFT baselines, random structures, full fine-tuning) goes
through `train_and_evaluate` with the same data, epochs and optimiser settings, so their scores are comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .data import load_dataset_splits, tokenize_splits
from .metrics import classification_compute_metrics
from .resolution import resolve
from .selection import decided_mass
from .structure import SearchedStructure
from .trainer import S3SearchTrainer
from .tuner.config import S3SearchConfig


@dataclass
class ClassificationTask:
    """A tokenized data set with train / validation / test splits and the model it is tokenized for.

    `gguf_file` names the weights file inside `model_path` when the model ships as GGUF (SmolLM2 in
    `peft_s3.data.smollm2_gguf()`); `fresh_classifier` de-quantizes it to float32.
    """

    model_path: str
    dataset: str
    tokenizer: PreTrainedTokenizerBase
    splits: Any
    label_names: list[str]
    gguf_file: Optional[str] = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class TrainingRecipe:
    """Optimiser settings shared by search, retraining and every baseline (paper appendix B.2: AdamW, linear decay)."""

    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 3e-4
    seed: int = 42
    logging_steps: int = 20
    bf16: bool = False
    disable_tqdm: bool = False

    def arguments(self, output_dir: str | Path, **overrides: Any) -> TrainingArguments:
        settings = {
            "output_dir": str(output_dir),
            "num_train_epochs": self.epochs,
            "per_device_train_batch_size": self.batch_size,
            "per_device_eval_batch_size": 2 * self.batch_size,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": "linear",
            "seed": self.seed,
            "data_seed": self.seed,
            "logging_steps": self.logging_steps,
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": [],
            "bf16": self.bf16,
            "disable_tqdm": self.disable_tqdm,
            "dataloader_num_workers": 0,
        }
        settings.update(overrides)
        return TrainingArguments(**settings)


def load_classification_task(
    dataset: str,
    model_path: str,
    seed: int = 42,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    max_length: int = 128,
    gguf_file: Optional[str] = None,
    validation_size: Optional[float | int] = None,
    test_size: Optional[float | int] = None,
) -> ClassificationTask:
    """Seeded splits of one of `peft_s3.data.AVAILABLE_DATASETS`, tokenized for the model at `model_path`.

    `validation_size` and `test_size` go to `peft_s3.data.load_dataset_splits` (a fraction or a row count); None keeps
    its defaults (10 % each; `amazon_food` keeps its official test split and refuses a `test_size`).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        # Decoder tokenizers may have no padding token. Their classifiers read the last token that is not padding,
        # so padding with end-of-sequence leaves every prediction as it is.
        tokenizer.pad_token = tokenizer.eos_token
    # Only the sizes given are passed on, so that load_dataset_splits' own defaults stay the single source of truth.
    sizes = {"validation_size": validation_size, "test_size": test_size}
    sizes = {name: size for name, size in sizes.items() if size is not None}
    splits = load_dataset_splits(dataset, seed=seed, max_train=max_train, max_eval=max_eval, **sizes)
    label_names = list(splits["train"].features["label"].names)
    return ClassificationTask(
        model_path, dataset, tokenizer, tokenize_splits(splits, tokenizer, max_length), label_names, gguf_file
    )


def fresh_classifier(task: ClassificationTask, seed: int) -> PreTrainedModel:
    """The pretrained backbone with a newly initialised classification head (seeded, so runs are repeatable).

    The model learns the tokenizer's padding id: a decoder's classifier finds each sequence's last real token by it.
    """
    set_seed(seed)
    # De-quantized GGUF weights as plain float tensors: Trainer refuses a model still marked GGUF-quantized, and with
    # the `kernels` package installed transformers would otherwise keep the weights packed in GGUF blocks.
    gguf = {} if task.gguf_file is None else {"quantization_config": GgufConfig(dequantize=True)}
    return AutoModelForSequenceClassification.from_pretrained(
        task.model_path,
        num_labels=task.num_labels,
        gguf_file=task.gguf_file,
        pad_token_id=task.tokenizer.pad_token_id,
        dtype=torch.float32,
        **gguf,
    )


def count_trainable_parameters(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Trainable parameters whose names contain none of `exclude` (e.g. the classification head)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not any(e in n for e in exclude))


def search_structure(
    task: ClassificationTask,
    config: S3SearchConfig,
    recipe: TrainingRecipe,
    output_dir: str | Path,
    **search_options: Any,
) -> tuple[nn.Module, SearchedStructure, dict[str, Any]]:
    """Run the S3 search on the training split (halved into D_delta and D_alpha) and choose the structure.

    `search_options` are keyword arguments of `S3SearchTrainer` (bilevel, alpha_learning_rate, annealing, ...; its
    defaults otherwise). With `select_on_validation=True` the resolved structure is evaluated on the validation split
    four times during the search and at its end, and the best one is returned; otherwise the structure resolved from
    the final gates. The stats hold the search's wall seconds and steps and how decided its gates ended
    (`decided_mass`: share of the budget that the resolved candidates hold, weighted by their p).
    """
    import peft

    model = peft.get_peft_model(fresh_classifier(task, recipe.seed), config)
    select_on_validation = search_options.get("select_on_validation", False)
    evaluation = {"eval_strategy": "steps", "eval_steps": 0.25} if select_on_validation else {}
    trainer = S3SearchTrainer(
        model=model,
        args=recipe.arguments(Path(output_dir) / "search", **evaluation),
        train_dataset=task.splits["train"],
        eval_dataset=task.splits["validation"] if select_on_validation else None,
        data_collator=DataCollatorWithPadding(task.tokenizer),
        **search_options,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    final = resolve(model, method=trainer.search_options.selection_method)
    structure = trainer.best_structure if select_on_validation else final
    # The resolved structure carries every candidate's final p: no second pass over the gates is needed.
    space = final.search_space
    chosen = [index for index, candidate in enumerate(space) if candidate.selected]
    stats = {
        "search_seconds": seconds,
        "search_steps": trainer.state.global_step,
        "decided_mass": decided_mass([c.p for c in space], [c.num_params for c in space], chosen, final.budget),
    }
    if select_on_validation:
        stats["structure_evaluations"] = trainer.structure_evaluations
        stats["selected_at_step"] = next(
            entry["step"]
            for entry in trainer.structure_evaluations
            if entry["candidates"] == [c.name for c in structure.candidates]
        )
    return model, structure, stats


def train_and_evaluate(
    model: nn.Module,
    task: ClassificationTask,
    recipe: TrainingRecipe,
    output_dir: str | Path,
    callbacks: Optional[list[TrainerCallback]] = None,
) -> dict[str, float]:
    """Train `model` on the training split with `recipe`, then score the test split (accuracy and macro-F1).

    The validation split is scored too, for model selection by callers; the test split only reports. `callbacks` go
    to the Trainer, for methods that act during training (AdaLoRA's rank allocation after each optimizer step).
    """
    trainer = Trainer(
        model=model,
        args=recipe.arguments(Path(output_dir) / "train"),
        train_dataset=task.splits["train"],
        data_collator=DataCollatorWithPadding(task.tokenizer),
        compute_metrics=classification_compute_metrics(),
        callbacks=None if callbacks is None else list(callbacks),
    )
    started = time.perf_counter()
    training = trainer.train()
    seconds = time.perf_counter() - started
    validation = trainer.evaluate(task.splits["validation"], metric_key_prefix="validation")
    test = trainer.evaluate(task.splits["test"], metric_key_prefix="test")
    return {
        "train_seconds": seconds,
        "validation_accuracy": validation["validation_accuracy"],
        "validation_macro_f1": validation["validation_macro_f1"],
        "test_accuracy": test["test_accuracy"],
        "test_macro_f1": test["test_macro_f1"],
        "train_loss": training.training_loss,
    }
