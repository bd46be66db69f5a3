"""Gate math of S3PET: shifted global sigmoid with a budget-solved shift, and binary-concrete gate samples.

All functions act on the whole vector of structural parameters at once, so a model with thousands of candidates pays
a handful of tensor ops per step, not a Python loop per candidate.
"""

from __future__ import annotations

import math

import torch

_GRID_POINTS = 16
_GRID_ROUNDS = 4
# Keeps the logit of p finite for the binary-concrete sample when the sigmoid saturates in float32.
_PROB_EPS = 1e-7


@torch.no_grad()
def solve_zeta(alpha: torch.Tensor, sizes: torch.Tensor, budget: float, tau: float) -> torch.Tensor:
    """Shift zeta such that sum_i sigmoid((alpha_i - zeta) / tau) * sizes_i == budget (paper eq. 17).

    The expected size is strictly decreasing in zeta, so a bracketing search is guaranteed to converge; it refines a
    grid of points per round instead of one midpoint, and runs a fixed number of rounds with no data-dependent Python
    control flow, so it never synchronises a GPU with the host. Requires 0 < budget < sizes.sum().
    """
    scaled = alpha.detach().double() / tau
    sizes = sizes.double()
    total = sizes.sum()
    # Below `low` every gate is ~1 (expected size ~total >= budget); above `high` the expected size is
    # <= total * exp(-(high - max alpha) / tau) <= budget.
    low = scaled.min() - 50.0
    high = scaled.max() + torch.log(total / budget) + 5.0
    steps = torch.linspace(0.0, 1.0, _GRID_POINTS, dtype=scaled.dtype, device=scaled.device)

    def expected_size(shift: torch.Tensor) -> torch.Tensor:
        # A sigmoid per (shift, candidate) pair stays exact however far apart the alphas are; factoring out one
        # exponential per candidate would need clamped exponents, which collapse alphas spread wider than ~700 tau.
        return torch.sigmoid(scaled - shift[..., None]) @ sizes

    for _ in range(_GRID_ROUNDS):
        grid = low + (high - low) * steps
        # expected_size is decreasing along the grid; the number of points still above budget locates the bracket.
        above = (expected_size(grid) > budget).sum().clamp(1, _GRID_POINTS - 1)
        low, high = grid[above - 1], grid[above]
    log_low, log_high = expected_size(low).log(), expected_size(high).log()
    # In the tails the expected size is close to exponential in zeta, so interpolate its logarithm.
    weight = ((log_low - math.log(budget)) / (log_low - log_high)).nan_to_num(0.5).clamp(0, 1)
    return ((low + weight * (high - low)) * tau).float()


def global_probabilities(alpha: torch.Tensor, zeta: torch.Tensor, tau: float) -> torch.Tensor:
    """p_i of eqs. 14-15: equal in value to sigmoid((alpha - zeta) / tau), but with the global-competition gradient."""
    p_tilde = torch.sigmoid((alpha - zeta) / tau)
    return p_tilde * (p_tilde.detach().sum() / p_tilde.sum())


def binary_concrete(p: torch.Tensor, noise: torch.Tensor, beta: float, hard: bool = False) -> torch.Tensor:
    """Relaxed Bernoulli(p) sample of eq. 7 from uniform `noise`; P(sample > 0.5) == p.

    With `hard`, the forward value is the 0/1 decision and the gradient is that of the relaxed sample.
    """
    p = p.clamp(_PROB_EPS, 1 - _PROB_EPS)
    logits = torch.log(noise) - torch.log1p(-noise) + torch.log(p) - torch.log1p(-p)
    soft = torch.sigmoid(logits / beta)
    if not hard:
        return soft
    # soft - soft.detach() is exactly 0, so the forward value stays exactly 0 or 1 (hard + soft - soft would round).
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


def gate_entropy(p: torch.Tensor) -> torch.Tensor:
    """Bernoulli entropy of each gate, in nats."""
    p = p.clamp(_PROB_EPS, 1 - _PROB_EPS)
    return -(p * p.log() + (1 - p) * torch.log1p(-p))


class GateBank:
    """The gates of one adapter: its structural parameters, candidate sizes and budget, and the current gate values.

    The tuner refreshes the bank once per forward pass of the whole model; every S3 layer then reads its contiguous
    slice of `values`. The uniform noise can be frozen so that several forward passes of one bi-level step see the
    same binary-concrete sample (paper footnote 6) while the gate values are still recomputed from the current alpha.
    """

    def __init__(
        self,
        alphas: torch.nn.ParameterDict,
        adapter_name: str,
        sizes: torch.Tensor,
        budget: int,
        tau: float,
        beta: float,
        hard: bool,
    ) -> None:
        # The alpha parameter is looked up on each use: peft and accelerate may replace the Parameter object.
        self._alphas = alphas
        self._adapter_name = adapter_name
        self.sizes = sizes
        self.budget = budget
        self.tau = tau
        self.beta = beta
        self.hard = hard
        self.values: torch.Tensor | None = None
        self.zeta: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.noise_frozen = False

    @property
    def alpha(self) -> torch.nn.Parameter:
        return self._alphas[self._adapter_name]

    def _sizes_on(self, device: torch.device) -> torch.Tensor:
        if self.sizes.device != device:
            self.sizes = self.sizes.to(device)
        return self.sizes

    def probabilities(self) -> torch.Tensor:
        """Gate probabilities p (differentiable w.r.t. alpha) with zeta solved for the budget."""
        sizes = self._sizes_on(self.alpha.device)
        self.zeta = solve_zeta(self.alpha, sizes, self.budget, self.tau)
        return global_probabilities(self.alpha.float(), self.zeta, self.tau)

    def refresh(self, training: bool) -> None:
        """Recompute the gate values: a binary-concrete sample when training, the probabilities p otherwise."""
        p = self.probabilities()
        if not training:
            self.values = p
            return
        if self.noise is None or not self.noise_frozen or self.noise.shape != p.shape:
            self.noise = torch.rand_like(p).clamp(_PROB_EPS, 1 - _PROB_EPS)
        self.values = binary_concrete(p, self.noise, self.beta, self.hard)

    def expected_num_params(self) -> torch.Tensor:
        with torch.no_grad():
            return self.probabilities() @ self._sizes_on(self.alpha.device).float()
