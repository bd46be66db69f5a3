"""Bi-level structure search with the HuggingFace `Trainer`: `S3SearchTrainer`.

The trainer is the `Trainer` plumbing of the search: it splits the data, keeps alpha out of the Trainer's optimizer,
hands each optimizer step's micro-batches and loss to the `SearchController` (`search_step.py`, where the alpha step
lives) and carries the search's state through logs, evaluations and checkpoints. `S3SearchCallback` (`callback.py`)
runs the same controller for scripts that cannot change their `Trainer` class.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer

from .arguments import SearchOptions
from .callback import S3SearchCallback
from .distributed import (
    check_sharded_search,
    gathered_state_dict,
    is_fsdp2_sharded,
    keep_alpha_out_of_accelerate_fsdp,
    keep_alpha_out_of_ddp,
)
from .estimators import requires_grad
from .gate_report import save_gate_report
from .search_data import search_and_delta_data
from .search_step import (
    SEARCH_STATE_NAME,
    DeltaStep,
    SearchController,
    SearchDivergedError,
    check_checkpointing_arguments,
    search_adapter,
)
from .structure import SearchedStructure
from .validation import BEST_STRUCTURE_NAME, StructureValidation

__all__ = ["BEST_STRUCTURE_NAME", "SEARCH_STATE_NAME", "S3SearchCallback", "S3SearchTrainer", "SearchDivergedError"]


class S3SearchTrainer(Trainer):
    """
    `transformers.Trainer` for S3PET structure search: alternates alpha updates on D_alpha with delta updates on
    D_delta, both on one binary-concrete gate sample per optimizer step (Algorithm 1 of the paper).

    Takes everything a `Trainer` takes (the model: a PeftModel with an S3 search adapter) and `search_dataset`,
    D_alpha; without it, a share `search_split` of `train_dataset` (seeded with `args.seed`) becomes D_alpha.

    Search options (`self.search_options`) are the fields of `args` when it is a `peft_s3.S3SearchArguments` (or
    `S3SFTConfig`), else the `SearchOptions` defaults; an option given as a keyword argument (`bilevel="first_order"`)
    takes precedence over `args`. Each field's `help` says what it does; unknown or bad options are refused here.

    Training log entries carry `s3/...` metrics (expected size and its target, zeta, temperatures, gate entropy,
    open gates, `s3/decided_mass`: 1 when the search is sure of its structure, `s3/resolved_changed`); with
    `select_on_validation` the best evaluated structure is `best_structure`. Checkpoints resume bit for bit. With
    gradient accumulation alpha gets as many micro-batches per step as delta. Fp32 and bf16 are supported, not fp16,
    DeepSpeed or FSDP1; alpha stays out of DDP and FSDP2 sharding (docs/fsdp.md) and is averaged explicitly.

    Example:

        ```py
        >>> args = peft_s3.S3SearchArguments("search", learning_rate=3e-4, bilevel="first_order")
        >>> trainer = peft_s3.S3SearchTrainer(
        ...     model=peft.get_peft_model(base_model, peft_s3.S3SearchConfig(budget=1e-4, task_type="SEQ_CLS")),
        ...     args=args,
        ...     train_dataset=train_dataset,  # split in half: D_alpha and D_delta
        ...     data_collator=collator,
        ...     alpha_learning_rate=0.1,  # overrides args.alpha_learning_rate
        ... )
        >>> trainer.train()
        ```
    """

    def __init__(self, *args: Any, search_dataset: Optional[Dataset] = None, **kwargs: Any) -> None:
        overrides = {name: kwargs.pop(name) for name in SearchOptions.names() if name in kwargs}
        super().__init__(*args, **kwargs)
        self.search_options = SearchOptions.from_arguments(self.args, **overrides)
        if self.args.fp16:
            raise ValueError("fp16=True is not supported by S3SearchTrainer (no loss scaling for alpha); use bf16.")
        check_sharded_search(self)
        check_checkpointing_arguments(self.args)
        if self.model is not None:
            search_adapter(self.model)
        self.structure_validation = StructureValidation(self.search_options.selection_method)
        if self.search_options.select_on_validation:
            self.structure_validation.check_evaluation(self.eval_dataset, self.args)
        self.search_dataset, self.train_dataset = search_and_delta_data(
            self.train_dataset, search_dataset, self.search_options.search_split, self.args.seed
        )
        # Made when training starts (create_optimizer): the model may come from model_init only then.
        self.search_controller: Optional[SearchController] = None
        # The D_delta micro-batches of the coming optimizer step, handed over by get_batch_samples.
        self._step_delta_batches: Optional[list[Any]] = None
        self._step_delta_items: Optional[Any] = None
        # Second order: the step's D_delta micro-batch losses, whose delta gradient is already in place.
        self._computed_delta_losses: list[torch.Tensor] = []

    @property
    def best_structure(self) -> Optional[SearchedStructure]:
        """With select_on_validation: the resolved structure of the best evaluation so far."""
        return self.structure_validation.best

    @property
    def structure_evaluations(self) -> list[dict[str, Any]]:
        """With select_on_validation: per evaluation, the step, the metric and the resolved structure's candidates."""
        return self.structure_validation.evaluations

    @property
    def alpha_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return None if self.search_controller is None else self.search_controller.optimizer

    @property
    def alpha_lr_scheduler(self) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
        return None if self.search_controller is None else self.search_controller.lr_scheduler

    # ------------------------------------------------------------------ optimizers

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, over every trainable parameter except alpha, which has its own optimizer."""
        self.search_controller = SearchController(self.model, self.search_options, self.args, self._search_dataloader)
        alpha = self.search_controller.alpha
        alpha_names = keep_alpha_out_of_ddp(self.model, alpha)
        keep_alpha_out_of_accelerate_fsdp(self, self.search_controller.tuner.s3_alpha)
        user_optimizer = self.optimizer is not None
        with requires_grad([alpha], False):
            optimizer = super().create_optimizer(model)
        if user_optimizer and any(p is alpha for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"The optimizer passed to S3SearchTrainer updates the structural parameters {alpha_names}; they have "
                "their own optimizer (alpha_learning_rate). Leave them out of the optimizer's parameter groups."
            )
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The Trainer's scheduler, plus a fresh alpha optimizer, its schedule and the D_alpha stream for this run."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.search_controller.start(self.model, num_training_steps)
        return scheduler

    def _search_dataloader(self) -> Iterable:
        return self._get_dataloader(
            dataset=self.search_dataset,
            description="Structure search",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # ------------------------------------------------------------------ the bi-level step

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_delta_batches = batch_samples
        self._step_delta_items = num_items_in_batch
        return batch_samples, num_items_in_batch

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[Any] = None
    ) -> torch.Tensor:
        """One delta micro-batch; the first micro-batch of an optimizer step updates alpha beforehand.

        In second order that alpha update already computed the step's delta gradient, which is left in place for the
        optimizer, so the micro-batches then only report their losses.
        """
        search = self.search_controller
        try:
            if self._step_delta_batches is not None:
                delta_batches, self._step_delta_batches = self._step_delta_batches, None
                step = self.state.global_step
                search.begin_step(step)
                # Drawn now, from the unseeded stream: drawn lazily, inside the first seeded pass of a second-order
                # step, it would use up that pass's dropout stream (issue 24).
                search.bank.draw_noise()
                if search.updates_alpha(step):
                    self._alpha_step(model, delta_batches, self._step_delta_items)
                    if search.is_stable(step):
                        self.control.should_training_stop = True
            if self._computed_delta_losses:
                loss = self._computed_delta_losses.pop(0)
            else:
                with requires_grad([search.alpha], False):
                    loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._computed_delta_losses = []
            search.end_step()
            raise
        if self.accelerator.sync_gradients:
            search.end_step()
        return loss

    def _alpha_step(self, model: nn.Module, delta_batches: list[Any], delta_items: Optional[Any]) -> None:
        """Update alpha on as many D_alpha micro-batches as the step has D_delta micro-batches (of which
        `delta_items` is the Trainer's `num_items_in_batch`)."""
        # Outside the DDP wrapper, so these extra passes neither synchronise nor confuse DDP's reducer.
        module = self.accelerator.unwrap_model(model)
        module.train()

        def search_loss(batches: list[Any]) -> Callable[[Any], torch.Tensor]:
            return self._loss_shares(module, batches, self._get_num_items_in_batch(batches, self.args.device))

        # Second order's first pass over the D_delta micro-batches is the delta step's own; its xi defaults to the
        # delta learning rate of this step, which the Trainer's scheduler has already set on the optimizer.
        delta_loss = self._loss_shares(module, delta_batches, delta_items, recorded_passes=len(delta_batches))
        delta = DeltaStep(delta_batches, delta_loss, self.optimizer.param_groups[0]["lr"])
        self._computed_delta_losses = self.search_controller.alpha_step(
            self.state.global_step, len(delta_batches), search_loss, delta
        )

    def _loss_shares(
        self, model: nn.Module, batches: list[Any], num_items_in_batch: Optional[Any], recorded_passes: int = 0
    ) -> Callable[[Any], torch.Tensor]:
        """Maps a micro-batch of `batches` to its share of their loss, weighted as `Trainer.training_step` weights the
        delta step: by items (tokens) when the loss is normalised by `num_items_in_batch`, else equally.

        The first `recorded_passes` calls count as training passes for metrics that `compute_loss` records (TRL's
        token accuracy and token counts); later calls run inside `_unrecorded_pass`.
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since transformers 5.2x
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        calls = itertools.count()

        def loss_share(batch: Any) -> torch.Tensor:
            inputs = self._prepare_inputs(batch)
            recording = contextlib.nullcontext() if next(calls) < recorded_passes else self._unrecorded_pass()
            with self.compute_loss_context_manager(), recording:
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss if scaled else loss / len(batches)

        return loss_share

    def _unrecorded_pass(self) -> contextlib.AbstractContextManager:
        """Around the search's extra passes (D_alpha, finite differences), for subclasses whose `compute_loss` records
        training metrics; the plain Trainer records none."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the search's structure

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; afterwards the gates are at the config's budget and temperatures, and with
        select_on_validation the final structure is evaluated too before `best_structure` is settled."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            if self.search_controller is not None:
                self.search_controller.end_annealing()
        if self.search_options.select_on_validation:
            self.evaluate()
        return output

    def evaluate(
        self,
        eval_dataset: Optional[Dataset] = None,
        ignore_keys: Optional[list[str]] = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """`Trainer.evaluate`; with select_on_validation, of the structure `resolve` would pick now (its 0/1 mask as
        the gates, the current deltas), keeping the best one in `best_structure`."""
        evaluate = functools.partial(super().evaluate, eval_dataset, ignore_keys, metric_key_prefix)
        if not self.search_options.select_on_validation or self.search_controller is None:
            return evaluate()
        step = self.state.global_step
        return self.structure_validation.evaluate(self.model, evaluate, self.args, metric_key_prefix, step)

    # ------------------------------------------------------------------ logging and checkpoints

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the `s3/...` search metrics to every training-loss log entry."""
        if "loss" in logs and self.search_controller is not None:
            logs.update(self.search_controller.log_metrics())
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.alpha_optimizer is not None:
            self.search_controller.save(output_dir, structure_evaluations=self.structure_evaluations)
            self.structure_validation.save(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        search_state = None if checkpoint is None else self.search_controller.load(checkpoint)
        if search_state is not None:
            self.structure_validation.load(checkpoint, search_state["structure_evaluations"])

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        # A model sharded before the Trainer (shard_model) reaches here on every process, with DTensor shards.
        if state_dict is None and self.is_distributed_loading_by_transformers and is_fsdp2_sharded(self.model):
            state_dict = gathered_state_dict(self.model)
        super()._save(output_dir, state_dict)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Saves the adapter as the Trainer does, plus the gate report (`s3_gates.json`) next to it."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_gate_report(self.model, output_dir or self.args.output_dir)
