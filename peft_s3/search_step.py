"""The alpha side of one S3PET search run, beside the estimators: `SearchController`.

S3PET (paper section 3.2, Algorithm 1) trains two sets of parameters on two halves of the training data: the
structural parameters alpha (one per gated candidate) on D_alpha, and the candidates' own weights delta on D_delta.
Each optimizer step first updates alpha, then delta, and both see the same binary-concrete gate sample (footnote 6).

`SearchController` owns everything of that beyond the delta step, which stays with the `Trainer`: the alpha AdamW
and its learning-rate schedule, the endless D_alpha batch stream, the budget and temperature annealing, the alpha
step itself (first order, or DARTS' second-order unrolled gradient from `estimators.py`), closing the gates that
cannot fit, the stability counter of `stop_when_stable`, the `s3/...` log metrics and the state a checkpoint needs
to resume all of it bit for bit. It does not know the `Trainer`: the caller hands it the loss of a micro-batch.

Per optimizer step, first order takes two forward/backward passes (alpha on D_alpha, then delta on D_delta at the
updated alpha). Second order computes grad_delta L_delta(delta, alpha) once, for the virtual step and for the delta
update, which makes four passes with the central difference of eq. 13 and three with the forward difference (two
when xi, `unrolled_learning_rate`, is 0, or when the scheduled delta learning rate of the step is 0).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional

import torch
from accelerate.utils import reduce
from peft import PeftModel
from torch import nn
from transformers import TrainingArguments
from transformers.optimization import get_scheduler
from transformers.utils import logging

from .arguments import SearchOptions
from .estimators import first_order_alpha_gradient, second_order_alpha_gradient
from .search_data import SearchBatches
from .selection import decided_mass, select
from .tuner.gates import GateBank, gate_entropy
from .tuner.model import S3Model

logger = logging.get_logger(__name__)

# The search's state in a checkpoint (`SearchController.save`).
SEARCH_STATE_NAME = "s3_search_state.pt"
# Maps a micro-batch to its share of the loss of the step's micro-batches (see `estimators.py`).
LossShare = Callable[[Any], torch.Tensor]


class SearchDivergedError(FloatingPointError):
    """The structure search produced a non-finite loss, alpha gradient or alpha; its gates would rank nothing."""


def search_adapter(model: Optional[nn.Module]) -> tuple[S3Model, GateBank, nn.Parameter]:
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


# Every layer reads its gates from one vector computed from alpha before the forward pass; reentrant checkpointing
# backpropagates each layer separately and would traverse that shared graph repeatedly.
def check_checkpointing_arguments(args: TrainingArguments) -> None:
    checkpointing_kwargs = args.activation_checkpointing_kwargs or {}
    if args.activation_checkpointing and checkpointing_kwargs.get("use_reentrant", False):
        raise ValueError(
            f"activation_checkpointing_kwargs={checkpointing_kwargs!r} is not allowed: the alpha gradient needs "
            'non-reentrant checkpointing, {"use_reentrant": False} (the transformers default).'
        )


def check_model_checkpointing(model: nn.Module) -> None:
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


class DeltaStep(NamedTuple):
    """What second order needs of the step's delta update: its D_delta micro-batches, the loss share of one and the
    delta learning rate in force (xi when `unrolled_learning_rate` is None)."""

    batches: Sequence[Any]
    loss_share: LossShare
    learning_rate: float


class SearchController:
    """
    The alpha side of one search run over `model`'s active search adapter, with the options of `options`.

    Made when the run's optimizer is: it finds the adapter's gates and alpha, checks the model's activation
    checkpointing, remembers the config's temperatures (the ends of the annealing) and takes every other trainable
    parameter as delta. `start(model, num_steps)`, once the run's length is known, takes the deltas again, creates
    the alpha AdamW (with `args`' Adam betas and epsilon) and its schedule over the alpha updates, and starts the
    D_alpha stream afresh; `search_dataloader` makes that stream's dataloader, called at the first alpha step. Per
    optimizer step the caller runs `begin_step`, `alpha_step` when `updates_alpha`, the delta update, then
    `end_step`; `save` and `load` carry all of it through checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        options: SearchOptions,
        args: TrainingArguments,
        search_dataloader: Callable[[], Iterable],
    ) -> None:
        self.options = options
        self.args = args
        self.search_dataloader = search_dataloader
        self.tuner, self.bank, self.alpha = search_adapter(model)
        check_model_checkpointing(model)
        self.final_temperatures = (self.bank.tau, self.bank.beta)
        self.delta_parameters = self._deltas(model)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lr_scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self.num_warmup_steps = self.num_search_steps = 0
        self._step_noise = contextlib.ExitStack()
        self._reset_run()

    def _deltas(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad and p is not self.alpha]

    def _reset_run(self) -> None:
        self._batches: Optional[SearchBatches] = None
        self._stream_state: dict[str, int] = {}
        self._alpha_loss_sum: Optional[torch.Tensor] = None
        self._alpha_loss_steps = 0
        # The structure resolve would pick at the last log entry, and at the last step with when it last changed.
        self._logged_resolved: Optional[list[int]] = None
        self._stable_resolved: Optional[list[int]] = None
        self._stable_since = 0

    def start(self, model: nn.Module, num_training_steps: int) -> None:
        """A fresh alpha optimizer, its schedule and D_alpha stream for a run of `num_training_steps` of `model`."""
        # Taken again: accelerate's FSDP2 shards the model after the optimizer is created, replacing every parameter
        # by a DTensor one.
        self.delta_parameters = self._deltas(model)
        self.num_warmup_steps, self.num_search_steps = _warmup_and_search_steps(
            num_training_steps, self.options.alpha_warmup_steps
        )
        num_alpha_updates = math.ceil(self.num_search_steps / self.options.alpha_update_interval)
        self.optimizer = torch.optim.AdamW(
            [self.alpha],
            lr=self.options.alpha_learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.options.alpha_weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            self.options.alpha_lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=0,
            num_training_steps=num_alpha_updates,
        )
        self._reset_run()

    # ------------------------------------------------------------------ one optimizer step

    def annealing_progress(self, step: int) -> float:
        annealing = self.options.annealing
        return 1.0 if annealing is None else annealing.progress(step - self.num_warmup_steps, self.num_search_steps)

    def begin_step(self, step: int) -> None:
        """The annealed budget and temperatures of optimizer step `step`, and one gate sample until `end_step`."""
        if self.options.annealing is not None:
            self.options.annealing.apply(self.bank, *self.final_temperatures, self.annealing_progress(step))
        self._step_noise.enter_context(self.tuner.frozen_gate_noise())

    def end_step(self) -> None:
        self._step_noise.close()

    def end_annealing(self) -> None:
        """The gates at the config's own budget and temperatures, whatever step the search stopped at."""
        if self.options.annealing is not None:
            self.options.annealing.apply(self.bank, *self.final_temperatures, progress=1.0)

    def updates_alpha(self, step: int) -> bool:
        search_step = step - self.num_warmup_steps
        return search_step >= 0 and search_step % self.options.alpha_update_interval == 0

    def next_search_batch(self) -> Any:
        if self._batches is None:
            self._batches = SearchBatches(self.search_dataloader(), self.args.seed, **self._stream_state)
        return next(self._batches)

    def alpha_step(
        self,
        step: int,
        num_batches: int,
        search_loss: Callable[[list[Any]], LossShare],
        delta: Optional[DeltaStep] = None,
    ) -> list[torch.Tensor]:
        """Update alpha on `num_batches` D_alpha micro-batches, whose loss shares `search_loss` gives.

        Second order also computes the step's delta gradient from `delta` and leaves it in `.grad` of the deltas for
        the delta update (Algorithm 1, step 4: delta descends grad_delta L_delta(delta, alpha), taken before alpha
        moves); it returns the D_delta micro-batch losses of that gradient. First order returns [].
        """
        search_batches = [self.next_search_batch() for _ in range(num_batches)]
        search_loss_share = search_loss(search_batches)
        delta_losses: list[torch.Tensor] = []
        if self.options.bilevel == "first_order":
            loss = first_order_alpha_gradient(search_loss_share, self.alpha, self.delta_parameters, search_batches)
        else:
            if delta is None:
                raise ValueError(
                    "bilevel='second_order' needs the step's delta update (a DeltaStep) for its alpha step."
                )
            # One seed per micro-batch for all passes of this step: the finite differences then compare the same
            # dropout masks, not mask noise (drawn from the global RNG, so checkpoints resume it).
            step_seed = int(torch.randint(2**62, (1,)))
            xi = self.options.unrolled_learning_rate
            unrolled = second_order_alpha_gradient(
                delta.loss_share,
                search_loss_share,
                self.alpha,
                self.delta_parameters,
                delta.batches,
                search_batches,
                step_seed,
                delta.learning_rate if xi is None else xi,
                self.options.finite_difference,
                self.options.finite_difference_epsilon,
            )
            loss, delta_losses = unrolled.search_loss, unrolled.delta_losses
            for parameter, gradient in zip(self.delta_parameters, unrolled.delta_gradient, strict=True):
                parameter.grad = gradient
        _apply_alpha_gradient(self.optimizer, self.lr_scheduler, loss, step)
        # Only once the schedules are over: while the budget is annealed, the room beside the decided set is not final.
        if self.options.close_unfittable and self.annealing_progress(step) >= 1.0:
            self.bank.close_unfittable(method=self.options.selection_method, overflow=self.options.close_overflow)
        self._alpha_loss_sum = loss if self._alpha_loss_sum is None else self._alpha_loss_sum + loss
        self._alpha_loss_steps += 1
        return delta_losses

    def is_stable(self, step: int) -> bool:
        """Whether the structure resolve would pick has stayed the same for `stop_when_stable` steps after the
        annealing; call once per alpha step."""
        if self.options.stop_when_stable is None or self.annealing_progress(step) < 1.0:
            return False
        resolved = _resolved_indices(self.bank, self.options.selection_method, _current_probabilities(self.bank))
        if resolved != self._stable_resolved:
            self._stable_resolved, self._stable_since = resolved, step
            return False
        return step + 1 - self._stable_since >= self.options.stop_when_stable

    # ------------------------------------------------------------------ logs and checkpoints

    def log_metrics(self) -> dict[str, float]:
        """The `s3/...` entries of a training-loss log entry; the alpha loss is averaged since the previous one."""
        # One zeta solve for both: the probabilities are computed once per log entry.
        probabilities = _current_probabilities(self.bank)
        resolved = _resolved_indices(self.bank, self.options.selection_method, probabilities)
        metrics = _search_metrics(self.bank, probabilities, resolved)
        metrics["s3/resolved_changed"] = len(set(resolved) ^ set(self._logged_resolved or []))
        self._logged_resolved = resolved
        if self._alpha_loss_steps:
            metrics["s3/alpha_loss"] = reduce(self._alpha_loss_sum, reduction="mean").item() / self._alpha_loss_steps
            self._alpha_loss_sum = None
            self._alpha_loss_steps = 0
        return metrics

    def save(self, output_dir: str, **search_state: Any) -> None:
        """The alpha optimizer, its schedule, the D_alpha stream's position and, under "search", what the search
        holds beyond them (with `search_state` of the caller), into `output_dir`'s `SEARCH_STATE_NAME`."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "search_batches": self._stream_state if self._batches is None else self._batches.state_dict(),
            "search": {
                # The shift solver's warm start, so that the resumed solves start from where the uninterrupted ones do.
                "zeta": None if self.bank.zeta is None else self.bank.zeta.clone(),
                "stable_resolved": self._stable_resolved,
                "stable_since": self._stable_since,
                "logged_resolved": self._logged_resolved,
                "alpha_loss_sum": None if self._alpha_loss_sum is None else self._alpha_loss_sum.detach().cpu(),
                "alpha_loss_steps": self._alpha_loss_steps,
                **search_state,
            },
        }
        torch.save(state, os.path.join(output_dir, SEARCH_STATE_NAME))

    def load(self, checkpoint: str) -> Optional[dict[str, Any]]:
        """Resumes from what `save` wrote into `checkpoint`; returns its "search" entry, None for a checkpoint
        without one (written by an older version, or by a plain Trainer)."""
        path = os.path.join(checkpoint, SEARCH_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                f"{checkpoint} has no {SEARCH_STATE_NAME}: the alpha optimizer and the D_alpha data order start "
                "afresh (the alphas themselves are restored with the adapter weights)."
            )
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._stream_state = dict(state["search_batches"])
        self._batches = None
        if "search" not in state:
            logger.warning(
                f"{checkpoint} was written before the search state was checkpointed: stop_when_stable counts and "
                "select_on_validation's evaluations start afresh."
            )
            return None
        search = state["search"]
        self.bank.zeta = search["zeta"]
        self._stable_resolved, self._stable_since = search["stable_resolved"], search["stable_since"]
        self._logged_resolved = search["logged_resolved"]
        loss_sum = search["alpha_loss_sum"]
        self._alpha_loss_sum = None if loss_sum is None else loss_sum.to(self.args.device)
        self._alpha_loss_steps = search["alpha_loss_steps"]
        return search
