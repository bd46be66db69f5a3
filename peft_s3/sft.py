"""Structure search inside TRL's `SFTTrainer`: `S3SFTTrainer` (needs the `trl` extra: `pip install peft-s3[trl]`).

Everything `SFTTrainer` does to the data (chat templates, completion-only and assistant-only loss, packing, padding
free batches) applies to both halves of the training data, and both levels of the search weight their micro-batches
by completion tokens the way `SFTTrainer` weights the delta step (`num_items_in_batch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

from datasets import Dataset, IterableDataset

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "peft_s3.sft needs TRL: install it with `pip install 'peft-s3[trl]'` (or `pip install trl`)."
    ) from error

from .trainer import S3SearchTrainer


class S3SFTTrainer(S3SearchTrainer, SFTTrainer):
    """
    `trl.SFTTrainer` that searches an S3 structure: the bi-level step of `S3SearchTrainer` on SFT data.

    Takes every argument of `SFTTrainer` plus `search_dataset`; the search options come from `args` as in
    `S3SearchTrainer` (an `S3SFTConfig`, `peft_s3.arguments`, carries them; keyword arguments take precedence).
    The model is either a PeftModel with an S3 search adapter or a base model with
    `peft_config=S3SearchConfig(...)`, which `SFTTrainer` applies itself. A `search_dataset` (D_alpha) is prepared
    exactly like `train_dataset`; without one, the prepared `train_dataset` is split (after packing, the split is
    by packed sequence).

    Token accuracy, entropy and `num_tokens` in the logs describe the delta (D_delta) passes only; the search's extra
    passes (D_alpha, finite differences) stay out of them.

    Example:

        ```py
        >>> from trl import SFTConfig
        >>> from peft_s3 import S3SearchConfig
        >>> from peft_s3.sft import S3SFTTrainer
        >>> trainer = S3SFTTrainer(
        ...     model=base_model,
        ...     args=SFTConfig("search", max_steps=200, completion_only_loss=True, gradient_accumulation_steps=4),
        ...     train_dataset=prompt_completion_dataset,
        ...     processing_class=tokenizer,
        ...     peft_config=S3SearchConfig(budget=1e-4, task_type="CAUSAL_LM"),
        ... )
        >>> trainer.train()
        ```
    """

    def __init__(self, *args: Any, search_dataset: Optional[Dataset | IterableDataset] = None, **kwargs: Any) -> None:
        super().__init__(*args, search_dataset=search_dataset, **kwargs)
        if search_dataset is not None and not self._skip_prepare_dataset:
            self.search_dataset = self._prepare_dataset(
                search_dataset, self.processing_class, self.args, self.args.packing, self._formatting_func, "search"
            )

    @contextlib.contextmanager
    def _unrecorded_pass(self) -> Iterator[None]:
        # SFTTrainer.compute_loss appends token accuracy and entropy to _metrics and counts trained tokens.
        metrics = self._metrics["train"]
        saved = {key: list(values) for key, values in metrics.items()}
        total_tokens = self._total_train_tokens
        try:
            yield
        finally:
            metrics.clear()
            metrics.update(saved)
            self._total_train_tokens = total_tokens
