"""Bi-level structure search with the HuggingFace `Trainer`: `S3SearchTrainer` and `S3SearchCallback`.

S3PET (paper section 3.2, Algorithm 1) trains two sets of parameters on two halves of the training data: the
structural parameters alpha (one per gated candidate) on D_alpha, and the candidates' own weights delta on D_delta.
Each optimizer step first updates alpha, then delta, and both see the same binary-concrete gate sample (footnote 6).

`S3SearchTrainer` is a drop-in replacement for `transformers.Trainer` that does exactly that, with first-order or
DARTS second-order (finite-difference) alpha gradients, its own AdamW for alpha, checkpoints that resume bit for bit,
and `s3/...` metrics in the normal training logs.

`S3SearchCallback` is for scripts that cannot change their `Trainer` class. A callback cannot run anything between
the start of an optimizer step and its delta update, so it updates alpha at the *end* of each step: delta first, then
alpha, still on the same gate sample. Because the alpha step then sees the freshly updated delta, the order is a half
step shifted from Algorithm 1, which makes no difference to first-order search; the second-order (unrolled) gradient
is only offered by the trainer. The callback does not add metrics to the logs and cannot save its alpha optimizer
state into checkpoints (on resume the alphas come back with the adapter weights, the alpha learning-rate schedule
continues where it was, but AdamW's moment estimates restart).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from accelerate.utils import reduce, send_to_device
from peft import PeftModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.optimization import get_scheduler
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .annealing import DEFAULT_ANNEALING, SearchAnnealing
from .distributed import (
    check_sharded_search,
    gathered_state_dict,
    is_fsdp2_sharded,
    keep_alpha_out_of_accelerate_fsdp,
)
from .estimators import (
    FINITE_DIFFERENCES,
    first_order_alpha_gradient,
    requires_grad,
    second_order_alpha_gradient,
)
from .gate_report import save_gate_report
from .resolution import resolve
from .selection import SELECTION_METHODS, decided_mass, select
from .structure import SearchedStructure
from .tuner.gates import GateBank, gate_entropy
from .tuner.model import S3Model

logger = logging.get_logger(__name__)

BILEVEL_MODES = ("first_order", "second_order")
# transformers scheduler types that need nothing but a step count.
ALPHA_LR_SCHEDULER_TYPES = ("linear", "cosine", "constant")
SEARCH_STATE_NAME = "s3_search_state.pt"
# With select_on_validation, the best structure so far, in a checkpoint (`SearchedStructure.save`'s JSON).
BEST_STRUCTURE_NAME = "s3_best_structure.json"
_DEFAULT_SEARCH_SPLIT = 0.5


def _search_adapter(model: Optional[nn.Module]) -> tuple[S3Model, GateBank, nn.Parameter]:
    """The S3 tuner, gate bank and structural parameters of the one active search adapter of `model`."""
    tuner = model.base_model if isinstance(model, PeftModel) else None
    if not isinstance(tuner, S3Model):
        raise ValueError(
            f"S3 search needs a PeftModel with an S3 search adapter, made by "
            f"`peft.get_peft_model(model, peft_s3.S3SearchConfig(budget=...))`; got {type(model).__name__}"
            + ("." if tuner is None else f" with a {type(tuner).__name__} tuner.")
        )
    names = [name for name in tuner.active_adapters if tuner.gate_bank(name) is not None]
    if len(names) != 1:
        raise ValueError(
            f"S3 search needs exactly one active search adapter, but the active adapters {tuner.active_adapters} "
            f"contain {len(names)}. A fixed-structure adapter (S3SearchConfig(structure=...)) has no structural "
            "parameters: retrain it with the plain transformers Trainer."
        )
    return tuner, tuner.gate_bank(names[0]), tuner.s3_alpha[names[0]]


def _alpha_optimizer(
    alpha: nn.Parameter,
    args: TrainingArguments,
    learning_rate: float,
    weight_decay: float,
    num_steps: int,
    scheduler_type: str,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on alpha with the run's Adam betas and epsilon, its learning rate on `scheduler_type` over `num_steps`."""
    optimizer = torch.optim.AdamW(
        [alpha],
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=weight_decay,
    )
    return optimizer, get_scheduler(scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=num_steps)


class SearchDivergedError(FloatingPointError):
    """The structure search produced a non-finite loss, alpha gradient or alpha; its gates would rank nothing."""


def _apply_alpha_gradient(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, loss: torch.Tensor, step: int
) -> bool:
    """One alpha update, unless the gradient is exactly zero; returns whether alpha moved.

    While every delta is still zero (the identity initialisation) no gate affects the loss, and the gradient is
    exactly 0: such a step would spend a step of the alpha schedule (and AdamW's bias correction) on nothing.
    Raises `SearchDivergedError` when the step's alpha loss, alpha gradient or alpha is not finite: NaN would
    otherwise flow into every gate, and the Trainer would log the filtered loss as 0 and carry on.
    """
    alpha = optimizer.param_groups[0]["params"][0]
    checked = {"the alpha (D_alpha) loss": loss.detach(), "alpha": alpha.detach()}
    if alpha.grad is not None:
        checked["the alpha gradient"] = alpha.grad
    finite = [torch.isfinite(tensor).all() for tensor in checked.values()]
    nonzero = alpha.grad.any() if alpha.grad is not None else torch.zeros((), dtype=torch.bool, device=alpha.device)
    *finite, update = torch.stack([*finite, nonzero]).tolist()  # one host sync for all the checks
    if not all(finite):
        broken = [name for name, ok in zip(checked, finite, strict=True) if not ok]
        raise SearchDivergedError(
            f"The structure search diverged at step {step}: {' and '.join(broken)} not finite. Lower "
            "alpha_learning_rate or the TrainingArguments learning_rate, check the data for empty or broken "
            "examples, and prefer bf16 over fp16."
        )
    if update:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return update


def _check_search_hyperparameters(
    alpha_learning_rate: float,
    alpha_weight_decay: float,
    alpha_warmup_steps: int | float,
    alpha_lr_scheduler_type: str,
) -> None:
    if not (isinstance(alpha_learning_rate, (int, float)) and 0 < alpha_learning_rate < math.inf):
        raise ValueError(f"alpha_learning_rate={alpha_learning_rate!r} is not allowed: it must be a finite float > 0.")
    if not (isinstance(alpha_weight_decay, (int, float)) and 0 <= alpha_weight_decay < math.inf):
        raise ValueError(f"alpha_weight_decay={alpha_weight_decay!r} is not allowed: it must be a finite float >= 0.")
    is_steps = isinstance(alpha_warmup_steps, int) and alpha_warmup_steps >= 0
    is_ratio = isinstance(alpha_warmup_steps, float) and 0 <= alpha_warmup_steps < 1
    if isinstance(alpha_warmup_steps, bool) or not (is_steps or is_ratio):
        raise ValueError(
            f"alpha_warmup_steps={alpha_warmup_steps!r} is not allowed: use an int >= 0 (optimizer steps) or a float "
            "in [0, 1) (a share of the run's optimizer steps)."
        )
    if alpha_lr_scheduler_type not in ALPHA_LR_SCHEDULER_TYPES:
        raise ValueError(
            f"alpha_lr_scheduler_type={alpha_lr_scheduler_type!r} is not allowed: choose one of "
            f"{list(ALPHA_LR_SCHEDULER_TYPES)}."
        )


def _annealing(annealing: Optional[SearchAnnealing | dict[str, Any]]) -> Optional[SearchAnnealing]:
    if isinstance(annealing, dict):
        return SearchAnnealing(**annealing)
    if annealing is not None and not isinstance(annealing, SearchAnnealing):
        raise ValueError(
            f"annealing={annealing!r} is not allowed: pass a SearchAnnealing, a dict of its fields, or None."
        )
    return annealing


# Every layer reads its gates from one vector computed from alpha before the forward pass; reentrant checkpointing
# backpropagates each layer separately and would traverse that shared graph repeatedly.
def _check_checkpointing_arguments(args: TrainingArguments) -> None:
    checkpointing_kwargs = args.activation_checkpointing_kwargs or {}
    if args.activation_checkpointing and checkpointing_kwargs.get("use_reentrant", False):
        raise ValueError(
            f"activation_checkpointing_kwargs={checkpointing_kwargs!r} is not allowed: the alpha gradient needs "
            'non-reentrant checkpointing, {"use_reentrant": False} (the transformers default).'
        )


def _check_model_checkpointing(model: nn.Module) -> None:
    """Checkpointing turned on through the model itself shows only on its layers; checked once the Trainer has set
    up the final model (model_init, TrainingArguments(gradient_checkpointing=True) re-enabling it)."""
    for name, module in model.named_modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        checkpoint_function = getattr(module, "_gradient_checkpointing_func", None)
        # Without a use_reentrant keyword (peft's prepare_model_for_kbit_training passes {}), torch's checkpoint
        # runs reentrant.
        if getattr(checkpoint_function, "keywords", {}).get("use_reentrant", True):
            raise ValueError(
                f"{name or type(module).__name__} has reentrant activation checkpointing, turned on through the "
                "model; the alpha gradient needs the non-reentrant kind. Call "
                'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}), or '
                "leave it to TrainingArguments(gradient_checkpointing=True), whose default is non-reentrant."
            )


def _warmup_and_search_steps(max_steps: int, alpha_warmup_steps: int | float) -> tuple[int, int]:
    """Warm-up and structure-search steps of a run of `max_steps`: a float `alpha_warmup_steps` is a share of them
    (rounded up, as TrainingArguments' warmup_steps), an int a count; it must leave at least one search step."""
    steps = alpha_warmup_steps if isinstance(alpha_warmup_steps, int) else math.ceil(alpha_warmup_steps * max_steps)
    if steps >= max_steps:
        raise ValueError(
            f"alpha_warmup_steps={alpha_warmup_steps} leaves no structure-search step in a run of {max_steps} "
            f"optimizer steps; use fewer than {max_steps} warm-up steps or train longer."
        )
    return steps, max_steps - steps


def _current_probabilities(bank: GateBank) -> torch.Tensor:
    with torch.no_grad():
        return bank.probabilities().detach().float().cpu()


def _resolved_indices(bank: GateBank, method: str, probabilities: torch.Tensor) -> list[int]:
    """The candidates `resolve` would pick from the bank's current gates (indices in gate order)."""
    alpha = bank.alpha.detach().float().cpu().tolist()
    return select(probabilities.tolist(), alpha, bank.sizes.long().cpu().tolist(), bank.budget, method)


def _search_metrics(bank: GateBank, probabilities: torch.Tensor, resolved: list[int]) -> dict[str, float]:
    """The `s3/...` log entries: expected size against the budget, the shift zeta, gate entropy, open gates, the
    temperatures and how decided the search is (`decided_mass`: share of the budget that the candidates `resolve`
    would pick hold, weighted by their p)."""
    sizes = bank.sizes.cpu()
    return {
        "s3/expected_params": float(probabilities @ sizes.float()),
        "s3/target_params": bank.expected_size,
        "s3/budget": float(bank.budget),
        "s3/zeta": bank.zeta.item(),
        "s3/tau": bank.tau,
        "s3/beta": bank.beta,
        "s3/gate_entropy": gate_entropy(probabilities).mean().item(),
        "s3/gates_open": int((probabilities > 0.5).sum().item()),
        "s3/decided_mass": decided_mass(probabilities.tolist(), sizes.tolist(), resolved, bank.budget),
    }


class _SearchBatches:
    """Endless stream of D_alpha batches, epoch after epoch, that leaves the global CPU RNG untouched.

    Creating a DataLoader iterator draws from the global RNG (and a collator may too), so a stream created anew on
    resume would shift the gate noise of the resumed run. Every draw here runs in a forked RNG seeded from
    (seed, epoch, batch), which makes the stream reproducible from its position alone.
    """

    def __init__(self, dataloader: Iterable, seed: int, epoch: int = 0, batches_in_epoch: int = 0) -> None:
        self.dataloader = dataloader
        self.seed = seed
        self.epoch = epoch
        self.batches_in_epoch = batches_in_epoch
        self._iterator: Optional[Iterator] = None

    def _reseed(self, index: int) -> None:
        # Only the CPU generator: torch.manual_seed would also reseed CUDA, whose state the fork does not restore.
        torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)

    def __next__(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):
                if self._iterator is None:
                    self._reseed(-1)
                    if hasattr(self.dataloader, "set_epoch"):
                        self.dataloader.set_epoch(self.epoch)
                    self._iterator = iter(self.dataloader)
                    # Resuming mid-epoch replays the iterator (loading data only), which also replays the state of
                    # any dataloader workers.
                    for _ in range(self.batches_in_epoch):
                        next(self._iterator)
                self._reseed(self.batches_in_epoch)
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    self.epoch += 1
                    self.batches_in_epoch = 0
                    self._iterator = None
                    continue
                self.batches_in_epoch += 1
                return batch
        raise ValueError("The structure-search dataloader (D_alpha) yields no batches; give it at least one example.")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


class S3SearchTrainer(Trainer):
    """
    `transformers.Trainer` for S3PET structure search: alternates alpha updates on D_alpha with delta updates on
    D_delta, both on one binary-concrete gate sample per optimizer step (Algorithm 1 of the paper).

    Pass everything a `Trainer` takes (the model must be a PeftModel with an S3 search adapter); the extra keyword
    arguments configure the search:

    Args:
        search_dataset: D_alpha, the data for the structural parameters. Default: split off from `train_dataset`.
        search_split: Fraction of `train_dataset` that becomes D_alpha when `search_dataset` is None (default 0.5,
            as in the paper). The split is a permutation seeded with `args.seed`; the rest, D_delta, becomes
            `self.train_dataset`.
        alpha_learning_rate: Learning rate of the AdamW that updates alpha (see `alpha_lr_scheduler_type`). The
            paper's 0.1 is meant for thousands of steps; 0.5 decides the gates in the few dozen to hundreds that a
            short fine-tuning run has.
        alpha_weight_decay: Weight decay of that AdamW.
        alpha_lr_scheduler_type: The schedule of that learning rate over the search steps, as
            `TrainingArguments.lr_scheduler_type`: `"constant"` (the default), `"linear"` (decays to 0) or `"cosine"`.
            A rate that has decayed to 0 leaves the last few gates undecided when the search ends
            (benchmarks/README.md, "Holding the alpha learning rate up").
        bilevel: `"second_order"` (the default: DARTS' unrolled gradient, eqs. 10-13, with a finite-difference
            Hessian-vector product, the paper's Algorithm 1) or `"first_order"` (the alpha gradient at the current
            delta, half the passes). Per optimizer step, first order
            takes two forward/backward passes (alpha on D_alpha, then delta on D_delta at the updated alpha). Second
            order follows Algorithm 1 and footnote 6: it computes grad_delta L_delta(delta, alpha) once, for the
            virtual step and for the delta update, which makes four passes with the central difference of eq. 13
            and three with the forward difference (two when xi is 0, see `unrolled_learning_rate`).
        unrolled_learning_rate: xi of eqs. 11-13, the step size of the virtual delta update. Default: the delta
            learning rate in force at that step (the Trainer's schedule), as the paper defines xi. 0 drops the
            virtual step and with it the Hessian term: second order then takes two passes per step, like first
            order, but keeps second order's step order (the delta gradient taken at the alpha before its update, one
            gate sample and one dropout mask per micro-batch shared by both passes). A step whose scheduled delta
            learning rate is 0 (the first step of a warm-up) also runs these two passes only.
        finite_difference: How second order approximates the Hessian-vector product: `"central"` (eq. 13, error
            O(epsilon^2), two extra passes) or `"forward"` ((grad_alpha L_delta(delta+) - grad_alpha
            L_delta(delta)) / epsilon, error O(epsilon), one extra pass: grad_alpha L_delta(delta) comes with the
            delta gradient).
        finite_difference_epsilon: The finite-difference step is this divided by the norm of the gradient it
            perturbs along, as in DARTS.
        alpha_warmup_steps: Optimizer steps at the start during which only delta trains: an int is a count, a float
            in [0, 1) a share of the run's steps (as TrainingArguments' warmup_steps). Deltas start at zero (the
            identity), so alpha gets no signal until they have moved. (A step whose alpha gradient is exactly zero,
            such as the first first-order step, never updates alpha nor advances its schedule.)
        alpha_update_interval: Update alpha every k-th optimizer step of the search (k = 1, the default, is the
            paper); the steps between are plain delta steps on the same schedule of gates and temperatures. k = 2
            or 4 cut the search overhead over LoRA training roughly by k (`benchmarks/speed.py`); what that costs in
            structure quality is for the quality benchmark to say.
        annealing: a `SearchAnnealing` (or the dict of its fields): a budget schedule and temperature schedules that
            start wide and end at the adapter's budget, tau and beta. Default `DEFAULT_ANNEALING`: the expected
            size starts at 4x the budget and tau at 1, both annealed to the config's values over the first half of
            the search. None: no schedule (the config's budget and temperatures throughout).
        selection_method: how the structure is chosen from the gates (`resolve`'s `method`), for the logged
            convergence metrics and for `best_structure`: "exact" (sum of p, the paper's rule) or "greedy".
        select_on_validation: evaluate the structure `resolve` would pick at each evaluation (Trainer's
            `eval_strategy` / `eval_steps` on `eval_dataset`, gates fixed to its 0/1 mask with the current deltas)
            and keep the best by `args.metric_for_best_model` (default: the loss) in `best_structure`, as the paper
            does every I_eval steps. Needs an eval_dataset and an eval_strategy; the end of the search is evaluated
            too. Checkpoints keep the evaluations so far and the best structure (`s3_best_structure.json`), as they
            keep every other part of the search's state, so a resumed search continues exactly where it was.
        stop_when_stable: stop the search once the structure `resolve` would pick has not changed for this many
            optimizer steps after the annealing ended (None: run all steps).
        close_unfittable: after the annealing, close the gates of candidates that no longer fit beside the decided
            ones (`GateBank.close_unfittable`: decided are those `resolve` would pick now at p >= 0.5, by
            `selection_method`), so the expected size moves to candidates `resolve` can take; it never closes one
            `resolve` would pick (default; benchmarks/README.md, "Closing the gates that cannot fit", has what it
            changed).
        close_overflow: with close_unfittable, when the candidates at p >= 0.5 together exceed the budget, close those
            `resolve` would drop too, instead of waiting. Off by default: it ends searches more decided (the main
            command's on every seed tried), but tied the default on the paired grid's accuracy with means below it
            (benchmarks/README.md, "When the decided candidates overflow the budget").

    Each training log entry carries `s3/...` metrics: the expected size and its target (`s3/target_params`, above the
    budget while a budget schedule runs), zeta, temperatures, gate
    entropy, open gates, `s3/decided_mass` (the share of the budget held by the candidates `resolve` would pick,
    weighted by their p: 1 when the search is sure of its structure) and `s3/resolved_changed` (candidates that
    entered or left that structure since the previous log entry).

    With gradient accumulation, each optimizer step accumulates the alpha gradient over as many D_alpha micro-batches
    as the delta gradient gets D_delta micro-batches, so both levels see the same effective batch size, and alpha is
    updated once per optimizer step. Fp32 and bf16 are supported, fp16 (loss scaling) is not; DeepSpeed and FSDP1
    are not supported. In multi-process runs alpha is kept out of DDP and out of FSDP2's sharding (docs/fsdp.md) and
    averaged across processes explicitly.

    Example:

        ```py
        >>> import peft, peft_s3
        >>> model = peft.get_peft_model(base_model, peft_s3.S3SearchConfig(budget=1e-4, task_type="SEQ_CLS"))
        >>> trainer = peft_s3.S3SearchTrainer(
        ...     model=model,
        ...     args=TrainingArguments("search", learning_rate=3e-4, num_train_epochs=5, logging_steps=50),
        ...     train_dataset=train_dataset,  # split in half: D_alpha and D_delta
        ...     data_collator=collator,
        ...     alpha_learning_rate=0.1,
        ... )
        >>> trainer.train()
        >>> model.base_model.gate_report()[:3]
        ```
    """

    def __init__(
        self,
        *args: Any,
        search_dataset: Optional[Dataset] = None,
        search_split: Optional[float] = None,
        alpha_learning_rate: float = 0.5,
        alpha_weight_decay: float = 0.0,
        alpha_lr_scheduler_type: str = "constant",
        bilevel: str = "second_order",
        unrolled_learning_rate: Optional[float] = None,
        finite_difference: str = "central",
        finite_difference_epsilon: float = 0.01,
        alpha_warmup_steps: int | float = 0,
        alpha_update_interval: int = 1,
        annealing: Optional[SearchAnnealing | dict[str, Any]] = DEFAULT_ANNEALING,
        selection_method: str = "exact",
        select_on_validation: bool = False,
        stop_when_stable: Optional[int] = None,
        close_unfittable: bool = True,
        close_overflow: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_search_hyperparameters(
            alpha_learning_rate, alpha_weight_decay, alpha_warmup_steps, alpha_lr_scheduler_type
        )
        annealing = _annealing(annealing)
        if selection_method not in SELECTION_METHODS:
            raise ValueError(
                f"selection_method={selection_method!r} is not allowed: choose one of {list(SELECTION_METHODS)}."
            )
        if stop_when_stable is not None and (
            isinstance(stop_when_stable, bool) or not isinstance(stop_when_stable, int) or stop_when_stable < 1
        ):
            raise ValueError(f"stop_when_stable={stop_when_stable!r} is not allowed: use an int >= 1, or None.")
        if (
            isinstance(alpha_update_interval, bool)
            or not isinstance(alpha_update_interval, int)
            or alpha_update_interval < 1
        ):
            raise ValueError(
                f"alpha_update_interval={alpha_update_interval!r} is not allowed: use an int >= 1 (1 updates alpha at "
                "every optimizer step, as the paper does)."
            )
        if bilevel not in BILEVEL_MODES:
            raise ValueError(f"bilevel={bilevel!r} is not allowed: choose one of {list(BILEVEL_MODES)}.")
        if finite_difference not in FINITE_DIFFERENCES:
            raise ValueError(
                f"finite_difference={finite_difference!r} is not allowed: choose one of {list(FINITE_DIFFERENCES)}."
            )
        if unrolled_learning_rate is not None and not (
            isinstance(unrolled_learning_rate, (int, float))
            and not isinstance(unrolled_learning_rate, bool)
            and 0 <= unrolled_learning_rate < math.inf
        ):
            raise ValueError(
                f"unrolled_learning_rate={unrolled_learning_rate!r} is not allowed: it must be a finite float >= 0 "
                "(0: no virtual step, no Hessian term), or None for the delta learning rate of each step."
            )
        if not (isinstance(finite_difference_epsilon, (int, float)) and 0 < finite_difference_epsilon < math.inf):
            raise ValueError(
                f"finite_difference_epsilon={finite_difference_epsilon!r} is not allowed: it must be a finite "
                "float > 0."
            )
        if search_dataset is not None and search_split is not None:
            raise ValueError(
                f"Pass either search_dataset (an explicit D_alpha) or search_split={search_split!r} (the fraction of "
                "train_dataset to split off as D_alpha), not both."
            )
        if search_split is not None and (
            isinstance(search_split, bool) or not isinstance(search_split, (int, float)) or not 0 < search_split < 1
        ):
            raise ValueError(f"search_split={search_split!r} is not allowed: it must be a float in (0, 1).")
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("fp16=True is not supported by S3SearchTrainer (no loss scaling for alpha); use bf16.")
        check_sharded_search(self)
        _check_checkpointing_arguments(self.args)
        if self.model is not None:
            _search_adapter(self.model)
        if select_on_validation and (self.eval_dataset is None or self.args.eval_strategy == "no"):
            raise ValueError(
                "select_on_validation=True evaluates the resolved structure during the search: pass an eval_dataset "
                f"and an eval_strategy other than 'no' (got eval_dataset={type(self.eval_dataset).__name__}, "
                f"eval_strategy={self.args.eval_strategy!r})."
            )
        self.annealing = annealing
        self.selection_method = selection_method
        self.select_on_validation = select_on_validation
        self.stop_when_stable = stop_when_stable
        self.close_unfittable = close_unfittable
        self.close_overflow = close_overflow
        self.best_structure: Optional[SearchedStructure] = None
        """With select_on_validation: the resolved structure of the best evaluation so far."""
        self.structure_evaluations: list[dict[str, Any]] = []
        """With select_on_validation: per evaluation, the step, the metric and the resolved structure's candidates."""
        self.alpha_learning_rate = alpha_learning_rate
        self.alpha_weight_decay = alpha_weight_decay
        self.alpha_lr_scheduler_type = alpha_lr_scheduler_type
        self.bilevel = bilevel
        self.unrolled_learning_rate = unrolled_learning_rate
        self.finite_difference = finite_difference
        self.finite_difference_epsilon = finite_difference_epsilon
        self.alpha_warmup_steps = alpha_warmup_steps
        self.alpha_update_interval = alpha_update_interval
        if search_dataset is None:
            self.search_dataset, self.train_dataset = self._split(
                _DEFAULT_SEARCH_SPLIT if search_split is None else search_split
            )
        else:
            if has_length(search_dataset) and len(search_dataset) == 0:
                raise ValueError("search_dataset is empty; D_alpha needs at least one example.")
            self.search_dataset = search_dataset

        self.alpha_optimizer: Optional[torch.optim.Optimizer] = None
        self.alpha_lr_scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self._search_batches: Optional[_SearchBatches] = None
        self._search_stream_state: dict[str, int] = {}
        # The D_delta micro-batches of the coming optimizer step, handed over by get_batch_samples.
        self._step_delta_batches: Optional[list[Any]] = None
        self._step_delta_items: Optional[Any] = None
        # Second order: the step's D_delta micro-batch losses, whose delta gradient is already in place.
        self._computed_delta_losses: list[torch.Tensor] = []
        self._step_noise = contextlib.ExitStack()
        self._alpha_loss_sum: Optional[torch.Tensor] = None
        self._alpha_loss_steps = 0
        # Set when training starts (create_optimizer): the model may come from model_init only then.
        self._tuner: Optional[S3Model] = None
        self._bank: Optional[GateBank] = None
        self._alpha: Optional[nn.Parameter] = None
        self._delta_parameters: list[nn.Parameter] = []
        # The structure resolve would pick at the last log entry, and at the last step with when it last changed.
        self._logged_resolved: Optional[list[int]] = None
        self._stable_resolved: Optional[list[int]] = None
        self._stable_since = 0

    def _split(self, fraction: float) -> tuple[Dataset, Dataset]:
        dataset = self.train_dataset
        if dataset is None or not has_length(dataset):
            raise ValueError(
                "S3SearchTrainer splits train_dataset into D_alpha and D_delta, which needs a dataset with a length; "
                f"got {type(dataset).__name__}. Pass search_dataset explicitly for iterable datasets."
            )
        size = len(dataset)
        num_search = round(size * fraction)
        if not 0 < num_search < size:
            raise ValueError(
                f"search_split={fraction} of a train_dataset of {size} examples leaves {num_search} for D_alpha and "
                f"{size - num_search} for D_delta; both need at least one example (use a larger dataset)."
            )
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.args.seed)).tolist()
        parts = (sorted(order[:num_search]), sorted(order[num_search:]))
        if hasattr(dataset, "select"):
            # A datasets.Dataset keeps its type, so the Trainer can still drop the columns the model does not take.
            return tuple(dataset.select(indices) for indices in parts)
        return tuple(Subset(dataset, indices) for indices in parts)

    # ------------------------------------------------------------------ optimizers

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, over every trainable parameter except alpha, which has its own optimizer."""
        _check_model_checkpointing(self.model)
        self._tuner, self._bank, self._alpha = _search_adapter(self.model)
        self._final_temperatures = (self._bank.tau, self._bank.beta)
        self._delta_parameters = [p for p in self.model.parameters() if p.requires_grad and p is not self._alpha]
        # DDP never sees alpha: its gradient comes from forward passes outside the DDP wrapper and is averaged
        # explicitly, and it does not take part in the delta backward at all.
        alpha_names = [name for name, p in self.model.named_parameters() if p is self._alpha]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, alpha_names)
        keep_alpha_out_of_accelerate_fsdp(self, self._tuner.s3_alpha)
        user_optimizer = self.optimizer is not None
        with requires_grad([self._alpha], False):
            optimizer = super().create_optimizer(model)
        if user_optimizer and any(p is self._alpha for group in optimizer.param_groups for p in group["params"]):
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
        # accelerate's FSDP2 shards the model after create_optimizer, replacing every parameter by a DTensor one.
        self._delta_parameters = [p for p in self.model.parameters() if p.requires_grad and p is not self._alpha]
        self._num_warmup_steps, self._num_search_steps = _warmup_and_search_steps(
            num_training_steps, self.alpha_warmup_steps
        )
        num_alpha_updates = math.ceil(self._num_search_steps / self.alpha_update_interval)
        self.alpha_optimizer, self.alpha_lr_scheduler = _alpha_optimizer(
            self._alpha,
            self.args,
            self.alpha_learning_rate,
            self.alpha_weight_decay,
            num_alpha_updates,
            self.alpha_lr_scheduler_type,
        )
        self._search_batches = None
        self._search_stream_state = {}
        self._alpha_loss_sum = None
        self._alpha_loss_steps = 0
        self._logged_resolved = self._stable_resolved = None
        self._stable_since = 0
        return scheduler

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
        try:
            if self._step_delta_batches is not None:
                delta_batches, self._step_delta_batches = self._step_delta_batches, None
                self._anneal()
                self._step_noise.enter_context(self._tuner.frozen_gate_noise())
                # Drawn now, from the unseeded stream: drawn lazily, inside the first seeded pass of a second-order
                # step, it would use up that pass's dropout stream (issue 24).
                self._bank.draw_noise()
                search_step = self.state.global_step - self._num_warmup_steps
                if search_step >= 0 and search_step % self.alpha_update_interval == 0:
                    self._alpha_step(model, delta_batches, self._step_delta_items)
                    self._check_stable()
            if self._computed_delta_losses:
                loss = self._computed_delta_losses.pop(0)
            else:
                with requires_grad([self._alpha], False):
                    loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._computed_delta_losses = []
            self._step_noise.close()
            raise
        if self.accelerator.sync_gradients:
            self._step_noise.close()
        return loss

    def _annealing_progress(self) -> float:
        if self.annealing is None:
            return 1.0
        return self.annealing.progress(self.state.global_step - self._num_warmup_steps, self._num_search_steps)

    def _anneal(self) -> None:
        if self.annealing is not None:
            tau, beta = self._final_temperatures
            self.annealing.apply(self._bank, tau, beta, self._annealing_progress())

    def _end_annealing(self) -> None:
        """The gates at the config's own budget and temperatures, whatever step the search stopped at."""
        if self._bank is not None and self.annealing is not None:
            self.annealing.apply(self._bank, *self._final_temperatures, progress=1.0)

    def _check_stable(self) -> None:
        """Stop the search once the structure resolve would pick has stayed the same for `stop_when_stable` steps."""
        if self.stop_when_stable is None or self._annealing_progress() < 1.0:
            return
        resolved = _resolved_indices(self._bank, self.selection_method, _current_probabilities(self._bank))
        if resolved != self._stable_resolved:
            self._stable_resolved, self._stable_since = resolved, self.state.global_step
        elif self.state.global_step + 1 - self._stable_since >= self.stop_when_stable:
            self.control.should_training_stop = True

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

    def _next_search_batch(self) -> Any:
        if self._search_batches is None:
            dataloader = self._get_dataloader(
                dataset=self.search_dataset,
                description="Structure search",
                batch_size=self._train_batch_size,
                sampler_fn=self._get_train_sampler,
                is_training=True,
            )
            self._search_batches = _SearchBatches(dataloader, self.args.seed, **self._search_stream_state)
        return next(self._search_batches)

    def _alpha_step(self, model: nn.Module, delta_batches: list[Any], delta_items: Optional[Any]) -> None:
        """Update alpha on as many D_alpha micro-batches as the step has D_delta micro-batches (of which
        `delta_items` is the Trainer's `num_items_in_batch`)."""
        # Outside the DDP wrapper, so these extra passes neither synchronise nor confuse DDP's reducer.
        module = self.accelerator.unwrap_model(model)
        module.train()
        search_batches = [self._next_search_batch() for _ in delta_batches]
        search_items = self._get_num_items_in_batch(search_batches, self.args.device)
        search_loss = self._loss_shares(module, search_batches, search_items)

        if self.bilevel == "first_order":
            loss = first_order_alpha_gradient(search_loss, self._alpha, self._delta_parameters, search_batches)
        else:
            # One seed per micro-batch for all passes of this step: the finite differences then compare the same
            # dropout masks, not mask noise (drawn from the global RNG, so checkpoints resume it).
            step_seed = int(torch.randint(2**62, (1,)))
            # xi is the delta learning rate of this step: the Trainer's scheduler has already set it on the optimizer.
            xi = (
                self.optimizer.param_groups[0]["lr"]
                if self.unrolled_learning_rate is None
                else self.unrolled_learning_rate
            )
            unrolled = second_order_alpha_gradient(
                # Its first pass over the D_delta micro-batches is the delta step's own.
                self._loss_shares(module, delta_batches, delta_items, recorded_passes=len(delta_batches)),
                search_loss,
                self._alpha,
                self._delta_parameters,
                delta_batches,
                search_batches,
                step_seed,
                xi,
                self.finite_difference,
                self.finite_difference_epsilon,
            )
            loss, self._computed_delta_losses = unrolled.search_loss, unrolled.delta_losses
            # Algorithm 1, step 4: delta descends grad_delta L_delta(delta, alpha), taken before alpha moves.
            for parameter, gradient in zip(self._delta_parameters, unrolled.delta_gradient, strict=True):
                parameter.grad = gradient
        _apply_alpha_gradient(self.alpha_optimizer, self.alpha_lr_scheduler, loss, self.state.global_step)
        # Only once the schedules are over: while the budget is annealed, the room beside the decided set is not final.
        if self.close_unfittable and self._annealing_progress() >= 1.0:
            self._bank.close_unfittable(method=self.selection_method, overflow=self.close_overflow)
        self._alpha_loss_sum = loss if self._alpha_loss_sum is None else self._alpha_loss_sum + loss
        self._alpha_loss_steps += 1

    # ------------------------------------------------------------------ the search's structure

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; afterwards the gates are at the config's budget and temperatures, and with
        select_on_validation the final structure is evaluated too before `best_structure` is settled."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            self._end_annealing()
        if self.select_on_validation:
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
        if not self.select_on_validation or self._bank is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        structure = resolve(self.model, method=self.selection_method)
        mask = torch.tensor([candidate.selected for candidate in structure.search_space], dtype=torch.float32)
        with self._tuner.fixed_eval_gates(mask):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        name = self.args.metric_for_best_model or "loss"
        key = name if name.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{name}"
        if key not in metrics:
            raise ValueError(
                f"select_on_validation compares evaluations by {key!r} (metric_for_best_model={name!r}), which the "
                f"evaluation did not return; it returned {sorted(metrics)}."
            )
        greater = self.args.greater_is_better if self.args.greater_is_better is not None else not key.endswith("loss")
        value = metrics[key]
        earlier = [entry["value"] for entry in self.structure_evaluations]
        if not earlier or (value > max(earlier) if greater else value < min(earlier)):
            self.best_structure = structure
        self.structure_evaluations.append(
            {
                "step": self.state.global_step,
                "metric": key,
                "value": value,
                "candidates": [c.name for c in structure.candidates],
            }
        )
        return metrics

    # ------------------------------------------------------------------ logging and checkpoints

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the `s3/...` search metrics to every training-loss log entry."""
        if "loss" in logs and self._bank is not None:
            # One zeta solve for both: the probabilities are computed once per log entry.
            probabilities = _current_probabilities(self._bank)
            resolved = _resolved_indices(self._bank, self.selection_method, probabilities)
            logs.update(_search_metrics(self._bank, probabilities, resolved))
            logs["s3/resolved_changed"] = len(set(resolved) ^ set(self._logged_resolved or []))
            self._logged_resolved = resolved
            if self._alpha_loss_steps:
                alpha_loss = reduce(self._alpha_loss_sum, reduction="mean").item() / self._alpha_loss_steps
                logs["s3/alpha_loss"] = alpha_loss
                self._alpha_loss_sum = None
                self._alpha_loss_steps = 0
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.alpha_optimizer is not None:
            state = {
                "optimizer": self.alpha_optimizer.state_dict(),
                "lr_scheduler": self.alpha_lr_scheduler.state_dict(),
                "search_batches": (
                    self._search_stream_state if self._search_batches is None else self._search_batches.state_dict()
                ),
                "search": self._search_state(),
            }
            torch.save(state, os.path.join(output_dir, SEARCH_STATE_NAME))
            if self.best_structure is not None:
                self.best_structure.save(os.path.join(output_dir, BEST_STRUCTURE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SEARCH_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"{checkpoint} has no {SEARCH_STATE_NAME}: the alpha optimizer and the D_alpha data order start "
                "afresh (the alphas themselves are restored with the adapter weights)."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.alpha_optimizer.load_state_dict(state["optimizer"])
        self.alpha_lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._search_stream_state = dict(state["search_batches"])
        self._search_batches = None
        if "search" in state:
            self._load_search_state(state["search"], checkpoint)
        else:
            logger.warning(
                f"{checkpoint} was written before the search state was checkpointed: stop_when_stable counts and "
                "select_on_validation's evaluations start afresh."
            )

    def _search_state(self) -> dict[str, Any]:
        """What the search holds beyond alpha, its optimizer and the data streams, for a resume bit for bit."""
        return {
            # The shift solver's warm start, so that the resumed solves start from where the uninterrupted ones do.
            "zeta": None if self._bank.zeta is None else self._bank.zeta.clone(),
            "stable_resolved": self._stable_resolved,
            "stable_since": self._stable_since,
            "logged_resolved": self._logged_resolved,
            "alpha_loss_sum": None if self._alpha_loss_sum is None else self._alpha_loss_sum.detach().cpu(),
            "alpha_loss_steps": self._alpha_loss_steps,
            "structure_evaluations": self.structure_evaluations,
        }

    def _load_search_state(self, state: dict[str, Any], checkpoint: str) -> None:
        self._bank.zeta = state["zeta"]
        self._stable_resolved, self._stable_since = state["stable_resolved"], state["stable_since"]
        self._logged_resolved = state["logged_resolved"]
        loss_sum = state["alpha_loss_sum"]
        self._alpha_loss_sum = None if loss_sum is None else loss_sum.to(self.args.device)
        self._alpha_loss_steps = state["alpha_loss_steps"]
        self.structure_evaluations = [dict(entry) for entry in state["structure_evaluations"]]
        best = os.path.join(checkpoint, BEST_STRUCTURE_NAME)
        self.best_structure = SearchedStructure.load(best) if os.path.isfile(best) else None

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


class S3SearchCallback(TrainerCallback):
    """
    First-order S3PET structure search as a callback, for scripts that cannot swap their `Trainer` class.

    Each optimizer step, after the Trainer's delta update, the callback updates alpha with its own AdamW on
    `args.gradient_accumulation_steps` batches of `search_dataloader` (D_alpha), on the same gate sample the delta
    step used. It takes alpha out of the Trainer's optimizer by freezing it when the Trainer is created, so pass it
    in `Trainer(callbacks=[...])`, not through `add_callback` afterwards; alpha stays frozen (`requires_grad=False`)
    outside the callback's own alpha steps. The Trainer's `train_dataset` is D_delta; keep it disjoint from D_alpha.
    Batches of `search_dataloader` must carry labels, so that the model returns its loss. `annealing` (default
    `DEFAULT_ANNEALING`, as in `S3SearchTrainer`) is applied at the start of each step; `alpha_learning_rate`,
    `alpha_weight_decay`, `alpha_warmup_steps` and `alpha_lr_scheduler_type` mean what they do there. See the module
    docstring for how this differs from `S3SearchTrainer`; also, its alpha step averages the micro-batch losses
    equally, where `S3SearchTrainer` weights them by tokens as the Trainer's delta step does (it matters for causal
    LMs with gradient accumulation: use `S3SearchTrainer` or `peft_s3.sft.S3SFTTrainer` there).

    Example:

        ```py
        >>> search_loader = DataLoader(search_set, batch_size=32, shuffle=True, collate_fn=collator)
        >>> callback = peft_s3.S3SearchCallback(search_loader)
        >>> trainer = Trainer(model=model, args=args, train_dataset=delta_set, callbacks=[callback])
        >>> trainer.train()
        ```
    """

    def __init__(
        self,
        search_dataloader: Iterable,
        alpha_learning_rate: float = 0.5,
        alpha_weight_decay: float = 0.0,
        alpha_warmup_steps: int | float = 0,
        annealing: Optional[SearchAnnealing | dict[str, Any]] = DEFAULT_ANNEALING,
        alpha_lr_scheduler_type: str = "constant",
    ) -> None:
        _check_search_hyperparameters(
            alpha_learning_rate, alpha_weight_decay, alpha_warmup_steps, alpha_lr_scheduler_type
        )
        self.annealing = _annealing(annealing)
        self.search_dataloader = search_dataloader
        self.alpha_learning_rate = alpha_learning_rate
        self.alpha_weight_decay = alpha_weight_decay
        self.alpha_warmup_steps = alpha_warmup_steps
        self.alpha_lr_scheduler_type = alpha_lr_scheduler_type
        self.alpha_optimizer: Optional[torch.optim.Optimizer] = None
        self.alpha_lr_scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self._step_noise = contextlib.ExitStack()

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        _, _, alpha = _search_adapter(kwargs.get("model"))
        # Frozen until the callback's own alpha step, so the Trainer's optimizer never takes it.
        alpha.requires_grad_(False)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        _check_checkpointing_arguments(args)
        self._tuner, self._bank, self._alpha = _search_adapter(kwargs.get("model"))
        _check_model_checkpointing(kwargs["model"])
        optimizer = kwargs.get("optimizer")
        if self._alpha.requires_grad or (
            optimizer is not None and any(p is self._alpha for g in optimizer.param_groups for p in g["params"])
        ):
            raise ValueError(
                "The Trainer's optimizer also updates the structural parameters alpha: pass S3SearchCallback in "
                "`Trainer(callbacks=[...])` (not `add_callback` after the Trainer was created), so it can keep alpha "
                "out of that optimizer."
            )
        self._num_warmup_steps, self._num_search_steps = _warmup_and_search_steps(
            state.max_steps, self.alpha_warmup_steps
        )
        self._final_temperatures = (self._bank.tau, self._bank.beta)
        self.alpha_optimizer, self.alpha_lr_scheduler = _alpha_optimizer(
            self._alpha,
            args,
            self.alpha_learning_rate,
            self.alpha_weight_decay,
            self._num_search_steps,
            self.alpha_lr_scheduler_type,
        )
        # A resumed run continues the learning-rate schedule (the AdamW moments are not in the checkpoint).
        for _ in range(max(0, state.global_step - self._num_warmup_steps)):
            self.alpha_lr_scheduler.step()
        self._search_batches = _SearchBatches(self.search_dataloader, args.seed)
        self._device = args.device

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.annealing is not None:
            progress = self.annealing.progress(state.global_step - self._num_warmup_steps, self._num_search_steps)
            self.annealing.apply(self._bank, *self._final_temperatures, progress)
        self._step_noise.enter_context(self._tuner.frozen_gate_noise())

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.annealing is not None:
            self.annealing.apply(self._bank, *self._final_temperatures, progress=1.0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        try:
            if state.global_step > self._num_warmup_steps:
                self._alpha_step(kwargs["model"], args.gradient_accumulation_steps, state.global_step)
        finally:
            self._step_noise.close()

    def _alpha_step(self, model: nn.Module, num_batches: int, step: int) -> None:
        batches = [next(self._search_batches) for _ in range(num_batches)]

        def loss_fn(batch: Any) -> torch.Tensor:
            loss = model(**send_to_device(batch, self._device)).loss
            if loss is None:
                raise ValueError("S3SearchCallback needs search batches with labels, so the model returns a loss.")
            return loss / len(batches)

        deltas = [p for p in model.parameters() if p.requires_grad]
        with requires_grad([self._alpha], True):
            loss = first_order_alpha_gradient(loss_fn, self._alpha, deltas, batches)
        _apply_alpha_gradient(self.alpha_optimizer, self.alpha_lr_scheduler, loss, step)
