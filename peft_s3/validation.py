"""`select_on_validation`: a search's evaluations of the structure `resolve` would pick, and the best of them
(`StructureValidation`), as the paper validates the structure every I_eval steps."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import TrainingArguments

from .resolution import resolve
from .structure import SearchedStructure

# The best structure so far, in a checkpoint (`SearchedStructure.save`'s JSON).
BEST_STRUCTURE_NAME = "s3_best_structure.json"


class StructureValidation:
    """The evaluations of the resolved structure so far (`evaluations`: per evaluation, the step, the metric, its
    value and the structure's candidates) and the structure of the best one (`best`)."""

    def __init__(self, selection_method: str) -> None:
        self.selection_method = selection_method
        self.evaluations: list[dict[str, Any]] = []
        self.best: Optional[SearchedStructure] = None

    @staticmethod
    def check_evaluation(eval_dataset: Optional[Any], args: TrainingArguments) -> None:
        """Refuses a run that would never evaluate."""
        if eval_dataset is None or args.eval_strategy == "no":
            raise ValueError(
                "select_on_validation=True evaluates the resolved structure during the search: pass an eval_dataset "
                f"and an eval_strategy other than 'no' (got eval_dataset={type(eval_dataset).__name__}, "
                f"eval_strategy={args.eval_strategy!r})."
            )

    def evaluate(
        self,
        model: PeftModel,
        evaluate: Callable[[], dict[str, float]],
        args: TrainingArguments,
        metric_key_prefix: str,
        step: int,
    ) -> dict[str, float]:
        """`evaluate()` of the structure `resolve` would pick now (its 0/1 mask as the gates, the current deltas),
        kept in `best` when it scores best so far by `args.metric_for_best_model` (default: the loss)."""
        structure = resolve(model, method=self.selection_method)
        mask = torch.tensor([candidate.selected for candidate in structure.search_space], dtype=torch.float32)
        with model.base_model.fixed_eval_gates(mask):
            metrics = evaluate()
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{name}"
        if key not in metrics:
            raise ValueError(
                f"select_on_validation compares evaluations by {key!r} (metric_for_best_model={name!r}), which the "
                f"evaluation did not return; it returned {sorted(metrics)}."
            )
        greater = args.greater_is_better if args.greater_is_better is not None else not key.endswith("loss")
        value = metrics[key]
        earlier = [entry["value"] for entry in self.evaluations]
        if not earlier or (value > max(earlier) if greater else value < min(earlier)):
            self.best = structure
        candidates = [c.name for c in structure.candidates]
        self.evaluations.append({"step": step, "metric": key, "value": value, "candidates": candidates})
        return metrics

    def save(self, output_dir: str) -> None:
        """The best structure into a checkpoint; the evaluations go into the search state."""
        if self.best is not None:
            self.best.save(os.path.join(output_dir, BEST_STRUCTURE_NAME))

    def load(self, checkpoint: str, evaluations: list[dict[str, Any]]) -> None:
        self.evaluations = [dict(entry) for entry in evaluations]
        best = os.path.join(checkpoint, BEST_STRUCTURE_NAME)
        self.best = SearchedStructure.load(best) if os.path.isfile(best) else None
