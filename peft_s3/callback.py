"""First-order structure search as a `TrainerCallback`: `S3SearchCallback`, for scripts that cannot swap their Trainer.

A callback cannot run anything between the start of an optimizer step and its delta update, so it updates alpha at
the *end* of each step: delta first, then alpha, still on the same gate sample. Because the alpha step then sees the
freshly updated delta, the order is a half step shifted from Algorithm 1, which makes no difference to first-order
search; the second-order (unrolled) gradient is only offered by `S3SearchTrainer`. The callback does not add metrics
to the logs and cannot save its alpha optimizer state into checkpoints (on resume the alphas come back with the
adapter weights, the alpha learning-rate schedule continues where it was, but AdamW's moment estimates restart).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from accelerate.utils import send_to_device
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .arguments import SearchOptions
from .estimators import requires_grad
from .search_step import SearchController, check_checkpointing_arguments, search_adapter

# The search options a callback can honour; the others need the Trainer's step (S3SearchTrainer).
CALLBACK_OPTIONS = (
    "alpha_learning_rate",
    "alpha_weight_decay",
    "alpha_warmup_steps",
    "alpha_lr_scheduler_type",
    "annealing",
)


class S3SearchCallback(TrainerCallback):
    """
    First-order S3PET structure search as a callback, for scripts that cannot swap their `Trainer` class.

    Each optimizer step, after the Trainer's delta update, the callback updates alpha with its own AdamW on
    `args.gradient_accumulation_steps` batches of `search_dataloader` (D_alpha), on the same gate sample the delta
    step used. It takes alpha out of the Trainer's optimizer by freezing it when the Trainer is created, so pass it
    in `Trainer(callbacks=[...])`, not through `add_callback` afterwards; alpha stays frozen (`requires_grad=False`)
    outside the callback's own alpha steps. The Trainer's `train_dataset` is D_delta; keep it disjoint from D_alpha.
    Batches of `search_dataloader` must carry labels, so that the model returns its loss.

    `options` are the search options of `CALLBACK_OPTIONS` (`alpha_learning_rate`, `alpha_weight_decay`,
    `alpha_warmup_steps`, `alpha_lr_scheduler_type`, `annealing`), with the defaults and meaning of the fields of
    `peft_s3.SearchOptions`; annealing is applied at the start of each step. See the module docstring for how this
    differs from `S3SearchTrainer`; also, its alpha step averages the micro-batch losses equally, where
    `S3SearchTrainer` weights them by tokens as the Trainer's delta step does (it matters for causal LMs with
    gradient accumulation: use `S3SearchTrainer` or `peft_s3.sft.S3SFTTrainer` there).

    Example:

        ```py
        >>> search_loader = DataLoader(search_set, batch_size=32, shuffle=True, collate_fn=collator)
        >>> callback = peft_s3.S3SearchCallback(search_loader)
        >>> trainer = Trainer(model=model, args=args, train_dataset=delta_set, callbacks=[callback])
        >>> trainer.train()
        ```
    """

    def __init__(self, search_dataloader: Iterable, **options: Any) -> None:
        unsupported = sorted(set(options) - set(CALLBACK_OPTIONS))
        if unsupported:
            raise ValueError(
                f"{unsupported} are not options of S3SearchCallback, which takes {list(CALLBACK_OPTIONS)}; the other "
                "search options need S3SearchTrainer."
            )
        self.search_dataloader = search_dataloader
        self.options = SearchOptions(bilevel="first_order", close_unfittable=False, **options)
        self.controller: Optional[SearchController] = None

    @property
    def alpha_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return None if self.controller is None else self.controller.optimizer

    @property
    def alpha_lr_scheduler(self) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
        return None if self.controller is None else self.controller.lr_scheduler

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        _, _, alpha = search_adapter(kwargs.get("model"))
        # Frozen until the callback's own alpha step, so the Trainer's optimizer never takes it.
        alpha.requires_grad_(False)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        check_checkpointing_arguments(args)
        model = kwargs.get("model")
        controller = SearchController(model, self.options, args, lambda: self.search_dataloader)
        optimizer = kwargs.get("optimizer")
        if controller.alpha.requires_grad or (
            optimizer is not None and any(p is controller.alpha for g in optimizer.param_groups for p in g["params"])
        ):
            raise ValueError(
                "The Trainer's optimizer also updates the structural parameters alpha: pass S3SearchCallback in "
                "`Trainer(callbacks=[...])` (not `add_callback` after the Trainer was created), so it can keep alpha "
                "out of that optimizer."
            )
        controller.start(model, state.max_steps)
        # A resumed run continues the learning-rate schedule (the AdamW moments are not in the checkpoint).
        for _ in range(max(0, state.global_step - controller.num_warmup_steps)):
            controller.lr_scheduler.step()
        self.controller = controller

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.controller.begin_step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.controller.end_annealing()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        try:
            # global_step already counts the step that just ended.
            if self.controller.updates_alpha(state.global_step - 1):
                self._alpha_step(kwargs["model"], args.gradient_accumulation_steps, state.global_step)
        finally:
            self.controller.end_step()

    def _alpha_step(self, model: torch.nn.Module, num_batches: int, step: int) -> None:
        def loss_share(batch: Any) -> torch.Tensor:
            loss = model(**send_to_device(batch, self.controller.args.device)).loss
            if loss is None:
                raise ValueError("S3SearchCallback needs search batches with labels, so the model returns a loss.")
            return loss / num_batches

        with requires_grad([self.controller.alpha], True):
            self.controller.alpha_step(step, num_batches, lambda batches: loss_share)
