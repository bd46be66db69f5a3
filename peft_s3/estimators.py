"""Estimators of the structural (alpha) gradient of the bi-level search, as functions of a loss and its parameters.

Each estimator takes loss closures, the structural parameters alpha, the candidates' weights delta and the
micro-batches of one optimizer step; it sets alpha.grad and returns the losses it computed. A closure maps a
micro-batch to its *share* of the step's loss, so that the shares sum to the loss of the step: the micro-batch mean
divided by the number of micro-batches, or, for token-level losses, the micro-batch's summed token losses divided by
the tokens of all the step's micro-batches (what `Trainer` does with `num_items_in_batch`). Gradients are
averaged over data-parallel processes (a copy in a single process; FSDP2's DTensor shards come averaged by its
reduce-scatter). Nothing here knows about the `Trainer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .distributed import global_norm, mean_across_processes

FINITE_DIFFERENCES = ("central", "forward")
# Guards the finite-difference step eps / ||v|| when v vanishes; the Hessian term is then exactly zero anyway.
_MIN_NORM = 1e-12


@contextlib.contextmanager
def requires_grad(parameters: Sequence[nn.Parameter], enabled: bool) -> Iterator[None]:
    """Temporarily set requires_grad of `parameters` (frozen ones cost no weight-gradient matmuls); restores flags."""
    flags = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(enabled)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Within the block the RNG (dropout masks) restarts from `seed`; outside it is untouched. None: no change."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _accumulate_gradients(
    loss_fn: Callable[[Any], torch.Tensor], batches: Sequence[Any], seeds: Optional[Sequence[int]] = None
) -> list[torch.Tensor]:
    """Backpropagate the loss over `batches`, one micro-batch (its share of the loss) at a time.

    With `seeds`, micro-batch i runs with the RNG seeded by seeds[i], so passes over the same batches with the same
    seeds draw the same dropout masks. Returns the shares, detached: what `Trainer.training_step` returns for a
    micro-batch; they sum to the loss.
    """
    losses = []
    for batch, seed in zip(batches, seeds or [None] * len(batches), strict=True):
        with seeded(seed):
            loss = loss_fn(batch)
            loss.backward()
        losses.append(loss.detach().float())
    return losses


def _pop_gradients(parameters: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """The (process-averaged) gradients of `parameters`, zeros where none arrived; the .grad fields are cleared."""
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    for parameter in parameters:
        parameter.grad = None
    return mean_across_processes(gradients)


@torch.no_grad()
def _move(
    parameters: Sequence[nn.Parameter],
    start: list[torch.Tensor],
    scale: float | torch.Tensor,
    direction: list[torch.Tensor],
) -> None:
    """parameters <- start + scale * direction, in place."""
    for parameter, origin, step in zip(parameters, start, direction, strict=True):
        parameter.copy_(origin + scale * step)


def first_order_alpha_gradient(
    loss_fn: Callable[[Any], torch.Tensor], alpha: nn.Parameter, deltas: Sequence[nn.Parameter], batches: Sequence[Any]
) -> torch.Tensor:
    """Set alpha.grad to the gradient of the loss over `batches` (shares from `loss_fn`) at the current delta; returns
    that loss."""
    with requires_grad(deltas, False):
        loss = torch.stack(_accumulate_gradients(loss_fn, batches)).sum()
    alpha.grad = _pop_gradients([alpha])[0]
    return loss


class UnrolledGradient(NamedTuple):
    """What `second_order_alpha_gradient` computed besides alpha.grad."""

    search_loss: torch.Tensor
    """L_alpha at the unrolled delta'."""
    delta_gradient: list[torch.Tensor]
    """grad_delta L_delta(delta, alpha) (process-averaged), for the delta step."""
    delta_losses: list[torch.Tensor]
    """The D_delta micro-batch losses (shares) that gradient came from."""
    correction: torch.Tensor
    """xi times the Hessian-vector product of eq. 13, the term subtracted from grad_alpha L_alpha(delta', alpha)
    (zeros when xi = 0)."""


def second_order_alpha_gradient(
    delta_loss_fn: Callable[[Any], torch.Tensor],
    search_loss_fn: Callable[[Any], torch.Tensor],
    alpha: nn.Parameter,
    deltas: Sequence[nn.Parameter],
    delta_batches: Sequence[Any],
    search_batches: Sequence[Any],
    step_seed: int,
    xi: float,
    finite_difference: str = "central",
    finite_difference_epsilon: float = 0.01,
) -> UnrolledGradient:
    """Set alpha.grad to DARTS' unrolled gradient (eq. 13), with L_delta from `delta_loss_fn` over `delta_batches`
    and L_alpha from `search_loss_fn` over `search_batches`.

    Only the delta tensors are perturbed, in place, and copied back from a snapshot, so the model ends bit for bit
    where it started, with no gradients set. Every pass over D_delta micro-batch i runs with the RNG seeded by
    step_seed + 2 i (and D_alpha's by step_seed + 2 i + 1), so the passes of the finite difference see the same
    dropout masks; anything else random that the passes share (the gate noise) must be drawn before the call.

    With xi = 0 there is no virtual step and no correction: one pass over D_delta (for the delta step) and one over
    D_alpha at the same delta, the step order of second order at the cost of first order.
    """
    delta_seeds = [step_seed + 2 * index for index in range(len(delta_batches))]
    search_seeds = [step_seed + 2 * index + 1 for index in range(len(search_batches))]
    if xi == 0:
        with requires_grad([alpha], False):
            delta_losses = _accumulate_gradients(delta_loss_fn, delta_batches, delta_seeds)
        delta_gradient = _pop_gradients(deltas)
        with requires_grad(deltas, False):
            loss = torch.stack(_accumulate_gradients(search_loss_fn, search_batches, search_seeds)).sum()
        alpha.grad = _pop_gradients([alpha])[0]
        return UnrolledGradient(loss, delta_gradient, delta_losses, torch.zeros_like(alpha.grad))
    forward = finite_difference == "forward"
    snapshot = [p.detach().clone() for p in deltas]
    try:
        with requires_grad([alpha], forward):
            delta_losses = _accumulate_gradients(delta_loss_fn, delta_batches, delta_seeds)
        delta_gradient = _pop_gradients(deltas)
        # grad_alpha L_delta(delta, alpha), the forward difference's base point, from the same pass.
        base = _pop_gradients([alpha])[0] if forward else None
        _move(deltas, snapshot, -xi, delta_gradient)  # delta' = delta - xi grad_delta L_delta
        loss = torch.stack(_accumulate_gradients(search_loss_fn, search_batches, search_seeds)).sum()
        direct = _pop_gradients([alpha])[0]  # grad_alpha L_alpha(delta', alpha)
        direction = _pop_gradients(deltas)  # v = grad_delta' L_alpha(delta', alpha)
        norm = global_norm(direction)
        epsilon = finite_difference_epsilon / norm.clamp_min(_MIN_NORM)
        curvature = []
        for sign in (1.0,) if forward else (1.0, -1.0):
            _move(deltas, snapshot, sign * epsilon, direction)  # delta+- = delta +- epsilon v
            with requires_grad(deltas, False):
                _accumulate_gradients(delta_loss_fn, delta_batches, delta_seeds)
            curvature.append(_pop_gradients([alpha])[0])  # grad_alpha L_delta(delta+-, alpha)
        if forward:
            hessian_vector = (curvature[0] - base) / epsilon
        else:
            hessian_vector = (curvature[0] - curvature[1]) / (2 * epsilon)
        correction = xi * hessian_vector
        alpha.grad = direct - correction
    finally:
        with torch.no_grad():
            for parameter, start in zip(deltas, snapshot, strict=True):
                parameter.copy_(start)
                parameter.grad = None
    return UnrolledGradient(loss, delta_gradient, delta_losses, correction)
