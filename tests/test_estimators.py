"""The bi-level gradient estimators on their own: small smooth problems with exact gradients to compare against."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_s3.estimators import first_order_alpha_gradient, second_order_alpha_gradient, seeded

XI = 0.3


def _problem(seed: int = 0) -> tuple[nn.Parameter, list[nn.Parameter], torch.Tensor, list[torch.Tensor]]:
    """alpha gates a two-tensor delta; a batch is a target the gated delta is fitted to (smooth, not quadratic)."""
    generator = torch.Generator().manual_seed(seed)
    alpha = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64))
    deltas = [nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64)) for _ in range(2)]
    mixing = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    batches = [torch.randn(2, 2, generator=generator, dtype=torch.float64) for _ in range(4)]
    return alpha, deltas, mixing, batches


def _loss(alpha: torch.Tensor, deltas: list[torch.Tensor], mixing: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    gates = torch.sigmoid(alpha)[:, None]
    prediction = mixing @ torch.tanh(gates * deltas[0]) + mixing @ (gates * deltas[1]) ** 2
    return ((prediction - batch) ** 2).mean()


def _mean_loss(alpha, deltas, mixing, batches):
    return torch.stack([_loss(alpha, deltas, mixing, batch) for batch in batches]).mean()


def _shares(alpha, deltas, mixing, batches):
    """The loss closure the estimators take: a micro-batch's share of the mean over `batches`."""
    return lambda batch: _loss(alpha, deltas, mixing, batch) / len(batches)


def test_first_order_is_the_gradient_of_the_mean_loss_at_the_current_delta() -> None:
    alpha, deltas, mixing, batches = _problem()
    loss = first_order_alpha_gradient(_shares(alpha, deltas, mixing, batches), alpha, deltas, batches)
    expected = torch.autograd.grad(_mean_loss(alpha, deltas, mixing, batches), alpha)[0]
    torch.testing.assert_close(alpha.grad, expected)
    # Losses come back in float32, as the Trainer logs them.
    torch.testing.assert_close(loss, _mean_loss(alpha, deltas, mixing, batches).float().detach())
    assert all(delta.grad is None for delta in deltas)


def _exact_unrolled_gradient(alpha, deltas, mixing, delta_batches, search_batches) -> torch.Tensor:
    """grad_alpha L_alpha(delta - xi grad_delta L_delta(delta, alpha), alpha), by double backward."""
    inner = _mean_loss(alpha, deltas, mixing, delta_batches)
    gradients = torch.autograd.grad(inner, deltas, create_graph=True)
    unrolled = [delta - XI * gradient for delta, gradient in zip(deltas, gradients, strict=True)]
    return torch.autograd.grad(_mean_loss(alpha, unrolled, mixing, search_batches), alpha)[0]


@pytest.mark.parametrize("finite_difference, tolerance", [("central", 1e-4), ("forward", 5e-2)])
def test_second_order_matches_the_exact_unrolled_gradient(finite_difference: str, tolerance: float) -> None:
    alpha, deltas, mixing, batches = _problem(seed=1)
    delta_batches, search_batches = batches[:2], batches[2:]
    expected = _exact_unrolled_gradient(alpha, deltas, mixing, delta_batches, search_batches)
    start = [delta.detach().clone() for delta in deltas]

    loss, delta_gradient, delta_losses, _ = second_order_alpha_gradient(
        _shares(alpha, deltas, mixing, delta_batches),
        _shares(alpha, deltas, mixing, search_batches),
        alpha,
        deltas,
        delta_batches,
        search_batches,
        step_seed=0,
        xi=XI,
        finite_difference=finite_difference,
        finite_difference_epsilon=1e-3,
    )

    error = torch.linalg.vector_norm(alpha.grad - expected) / torch.linalg.vector_norm(expected)
    assert error < tolerance
    # The deltas end exactly where they started, with no gradient left; the delta step's gradient is returned.
    assert all(torch.equal(delta, origin) for delta, origin in zip(deltas, start, strict=True))
    assert all(delta.grad is None for delta in deltas)
    expected_delta_gradient = torch.autograd.grad(_mean_loss(alpha, deltas, mixing, delta_batches), deltas)
    for got, want in zip(delta_gradient, expected_delta_gradient, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.stack(delta_losses).sum(), _mean_loss(alpha, deltas, mixing, delta_batches).float().detach()
    )
    unrolled = [d - XI * g for d, g in zip(deltas, expected_delta_gradient, strict=True)]
    torch.testing.assert_close(loss, _mean_loss(alpha, unrolled, mixing, search_batches).float().detach())


def test_second_order_with_zero_xi_is_first_order_in_one_pass_per_micro_batch() -> None:
    alpha, deltas, mixing, batches = _problem(seed=2)
    delta_loss, search_loss = _shares(alpha, deltas, mixing, batches[:2]), _shares(alpha, deltas, mixing, batches[2:])
    first_order_alpha_gradient(search_loss, alpha, deltas, batches[2:])
    first = alpha.grad.clone()
    alpha.grad = None
    passes = []

    def counted(loss_fn):
        return lambda batch: passes.append(batch) or loss_fn(batch)

    result = second_order_alpha_gradient(
        counted(delta_loss), counted(search_loss), alpha, deltas, batches[:2], batches[2:], 0, xi=0.0
    )
    torch.testing.assert_close(alpha.grad, first)
    # Nothing to difference: each micro-batch is passed once, the delta step's gradient comes along.
    assert len(passes) == 4 and not result.correction.any()
    expected = torch.autograd.grad(_mean_loss(alpha, deltas, mixing, batches[:2]), deltas)
    for got, want in zip(result.delta_gradient, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert all(delta.grad is None for delta in deltas)


def test_seeded_passes_repeat_their_dropout_masks_and_leave_the_rng_alone() -> None:
    dropout = nn.Dropout(0.5)
    state = torch.random.get_rng_state()
    with seeded(11):
        first = dropout(torch.ones(64))
    with seeded(11):
        again = dropout(torch.ones(64))
    with seeded(12):
        other = dropout(torch.ones(64))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)
